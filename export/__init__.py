"""The export stage: an avatar's networks as portable graphs for other runtimes.

`export.onnx.export_onnx` writes static-shape ONNX graphs (`export.graphs`: conditioning embedding, denoiser,
decoder, code -> tokens) and `manifest.json` (`export.manifest`) into one folder, which the `onnxruntime` backend
(`engine.backends.onnxruntime`) runs. `export.command` is the `avatar export` command; nothing here imports the CLI.
"""
