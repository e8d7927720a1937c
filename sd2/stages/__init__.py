"""One module (or small subpackage) per stage. Each exposes `Config` and `run(config, inputs, out_dir, ctx)`."""
