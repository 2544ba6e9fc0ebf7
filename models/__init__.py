"""The shared tower: rendering (render), the model (tower), its ONNX graph (onnx_graph), versioned artifacts
(artifact), the runtime (encoder), the benchmark (bench) and the ``onetower model`` commands (cli)."""
