"""Writing a checkpoint as ONNX or a torch.export program, verified against it before it is kept."""
