"""The lab's sample app instance: a tiny HTTP server that says which app, instance and region answered.

    python -m geomesh.lab.sample_app --app hello --instance hello-eu-1 --region eu-central --listen 10.90.2.11:8000

Every response is `200 text/plain`: "hello from <app> instance <id> in <region> (client <X-Forwarded-For>)".
Keep-alive is honoured so the proxy's upstream pool is exercised; anything unparsable gets 400.
"""

from __future__ import annotations

import argparse
import asyncio
import signal


def response(app: str, instance: str, region: str, headers: dict[str, str]) -> bytes:
    client = headers.get("x-forwarded-for", "-")
    via = headers.get("x-geomesh-forwarded")
    body = f"hello from {app} instance {instance} in {region} (client {client}"
    body += f", forwarded by {via})\n" if via else ")\n"
    data = body.encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: " + str(len(data)).encode()
            + b"\r\nx-geomesh-instance: " + instance.encode() + b"\r\nx-geomesh-region: " + region.encode()
            + b"\r\n\r\n" + data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, app: str, instance: str, region: str) -> None:
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            writer.write(response(app, instance, region, headers))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve(app: str, instance: str, region: str, host: str, port: int) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, app, instance, region), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description="geomesh lab sample app instance")
    p.add_argument("--app", required=True, help="app name it reports")
    p.add_argument("--instance", required=True, help="instance id it reports")
    p.add_argument("--region", required=True, help="region it reports")
    p.add_argument("--listen", required=True, help="host:port to listen on")
    a = p.parse_args()
    host, _, port = a.listen.rpartition(":")
    asyncio.run(serve(a.app, a.instance, a.region, host, int(port)))


if __name__ == "__main__":
    main()
