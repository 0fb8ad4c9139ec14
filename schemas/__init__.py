"""hotlora."""
