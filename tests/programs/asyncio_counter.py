#!/usr/bin/env python3
"""A small asyncio TCP line server with per-connection and global state, for stasis's tests.

Each connection gets a number when it is accepted. A line `add N` adds N to the connection's
own sum and to the server's total; every reply says:
    conn=<number> lines=<lines on this connection> sum=<this connection's sum> total=<all connections' sum> conns=<open connections>
`state` answers the same without changing anything. The state lives only in memory.
Port: ASYNCIO_PORT (default 6121), on 127.0.0.1.
"""
import asyncio
import os
import sys

total = 0
accepted = 0
open_conns = 0


async def handle(reader, writer):
    global total, accepted, open_conns
    accepted += 1
    me = accepted
    open_conns += 1
    lines = 0
    mine = 0
    try:
        while True:
            raw = await reader.readline()
            if not raw:
                break
            words = raw.decode(errors="replace").split()
            if words[:1] == ["add"] and len(words) == 2:
                n = int(words[1])
                lines += 1
                mine += n
                total += n
            elif words[:1] != ["state"]:
                writer.write(b"error unknown request\n")
                await writer.drain()
                continue
            writer.write(f"conn={me} lines={lines} sum={mine} total={total} conns={open_conns}\n".encode())
            await writer.drain()
    finally:
        open_conns -= 1
        writer.close()


async def main():
    port = int(os.environ.get("ASYNCIO_PORT", "6121"))
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"listening on 127.0.0.1:{port} pid {os.getpid()}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
