"""The demo world: a generated image–caption world written in the real raw dataset formats."""
