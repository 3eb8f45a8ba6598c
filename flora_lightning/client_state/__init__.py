"""Per-client state kept between rounds (optimizer moments, personal heads): the stores, the
packing of a state into flat tensors, and the sharded files they are written to."""
