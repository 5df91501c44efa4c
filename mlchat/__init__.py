"""mlchat: a multi-datacenter, multi-leader chat backend."""
