"""``python -m examples.tornado_app [--port 8888]``: serve the notes app."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .app import create_tables, make_app, make_manager


async def main(port: int) -> None:
    db = make_manager()
    await create_tables(db)
    server = make_app(db).listen(port, address="127.0.0.1")
    print(f"notes app on http://127.0.0.1:{port}/ ({db.engine.url.render_as_string()})")
    try:
        await asyncio.Event().wait()
    finally:
        server.stop()
        await db.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args().port))
