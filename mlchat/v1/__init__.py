"""Generated gRPC and protobuf code for the mlchat.v1 API (see proto/mlchat/v1; regenerate with make proto)."""
