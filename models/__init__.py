"""The shared tower: state to text (render, texts), the model (tower, tuned), reading and writing versions
(artifact, export, onnx_graph), the runtime (encoder, incremental) and its benchmark (bench)."""
