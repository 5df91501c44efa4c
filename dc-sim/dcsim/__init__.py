"""dc-sim: several mlchat regions on one machine, with WAN effects between them."""
