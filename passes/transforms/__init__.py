"""Transform passes: GraphModule in, rewritten GraphModule out."""
