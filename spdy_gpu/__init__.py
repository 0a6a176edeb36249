"""spdy-gpu: prune a network to a guaranteed speedup on its real inference backend."""
