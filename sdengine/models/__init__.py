"""PyTorch reference networks of Stable Diffusion and the pure functions that map checkpoint layouts onto them."""
