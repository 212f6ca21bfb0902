"""The agent's local inference API for applications on the device.

wire.py is the protocol (frames, tensors, error codes; docs/PROTOCOL.md, "Local
inference API"), server.py the agent's side (asyncio, Unix-domain socket), client.py
the library an application uses (plain sockets). docs/DEVICE-API.md is the guide.
"""
