"""The moderated chat's screenshot (docs/img/chat-moderated.png), from a real run.

    .venv/bin/python scripts/screenshot_chat.py [--out docs/img/chat-moderated.png]

Starts ``python -m gateway`` in dev mode (its hooks: the chat demo's backend) and drives
the system Chromium (Playwright, ``/usr/bin/chromium``): two people talk in #lobby, a
third joins later and gets the kept messages over rpc, has a message refused for a
banned word and says it again politely. The picture is that third page.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser_helpers import chromium, join_chat
from tests.procs import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
VIEWPORT = {"width": 1100, "height": 720}


async def join(browser: Any, url: str, name: str) -> Any:
    context = await browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = await context.new_page()
    await join_chat(page, url, name)
    return page


async def say(page: Any, text: str, seen_by: Any) -> None:
    await page.fill("[data-testid=input]", text)
    await page.click("[data-testid=send]")
    await seen_by.wait_for_function(
        "text => [...document.querySelectorAll('[data-testid=message-text]')].some((m) => "
        "m.textContent === text)",
        arg=text,
        timeout=5_000,
    )


async def shoot(out: Path) -> None:
    gateway = GatewayProcess(env={"GATEWAY_LOG_LEVEL": "warning"})
    try:
        await gateway.wait_ready()
        url = f"{gateway.url}/chat?room=lobby"
        async with chromium() as browser:
            ada = await join(browser, url, "ada")
            grace = await join(browser, url, "grace")
            await say(ada, "Morning! The 2.4 release is tagged.", grace)
            await say(grace, "Great, I'll start the rollout after lunch.", ada)
            await say(ada, "Release notes are in the wiki.", grace)

            linus = await join(browser, url, "linus")  # the kept messages, over rpc
            await linus.wait_for_function(
                "document.querySelectorAll('[data-testid=message]').length === 3",
                timeout=5_000,
            )
            await linus.fill("[data-testid=input]", "darn, I missed the release meeting")
            await linus.click("[data-testid=send]")
            await linus.locator("[data-testid=refusal]").wait_for(timeout=5_000)
            await say(linus, "Oops, I missed the release meeting. Is there a recording?", ada)
            await say(ada, "Yes, I'll send you the link.", linus)
            await linus.fill("[data-testid=input]", "")
            await linus.evaluate("document.activeElement && document.activeElement.blur()")
            out.parent.mkdir(parents=True, exist_ok=True)
            await linus.screenshot(path=str(out))
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "chat-moderated.png")
    args = parser.parse_args()
    asyncio.run(shoot(args.out))
    print(args.out)


if __name__ == "__main__":
    main()
