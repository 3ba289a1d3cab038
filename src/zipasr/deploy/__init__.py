"""Using a trained model: transcribing audio files and exporting to ONNX for sherpa-onnx."""
