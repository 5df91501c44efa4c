"""Client-side geography: talking to regions and carrying causal tokens between them."""
