"""The online ranking service: FastAPI over Redis and ONNX Runtime."""
