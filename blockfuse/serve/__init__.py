"""The NBD server front end: ``blockfuse serve`` and ``blockfuse mount --serve``.

``exports.py`` says what each device advertises and is the transport's backend;
``requests.py`` does each request on a device through the byte bridge; ``listen.py``
opens the sockets (Unix, TCP, socket activation); ``control.py`` is the control socket
that ``blockfuse status``/``pivot`` talk to; ``runtime.py`` runs it all until a signal.
The protocol is ``blockfuse.nbd`` (sans-io) and the connections ``blockfuse.transport``.
"""
