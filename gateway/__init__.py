"""The gateway: authenticates external clients, resolves each call's tenant and shard, and
forwards request and response bytes to the right backend without decoding them."""
