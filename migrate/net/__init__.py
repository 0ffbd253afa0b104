"""Moving frames over sockets: the asyncio frame channel, TLS, the sending
rate limit and the loop threads that carry extra data channels."""
