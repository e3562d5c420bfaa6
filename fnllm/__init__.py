"""fnllm."""
