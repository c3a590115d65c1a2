"""Generated gRPC code for the tether.v1 API (see ../../regen.py). Do not edit the *_pb2 files."""
