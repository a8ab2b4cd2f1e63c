"""diffusers / transformers integration. The only place (with eval and samples) that imports them."""
