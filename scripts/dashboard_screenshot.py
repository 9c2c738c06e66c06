"""Screenshot of the Trait Dynamics dashboard for an experiment (Debian chromium + Playwright).

    python scripts/dashboard_screenshot.py --experiment smollm2-demo --out docs/dashboard.png [--clean top5-3layers]
"""

from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright

from tracelens.app.dashboard import serve_in_thread

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", default="0")
    p.add_argument("--clean", default="none", choices=["none", "top5-3layers", "all"])
    args = p.parse_args()
    server, _ = serve_in_thread(args.experiment)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_selector("body[data-ready='1']", timeout=20000)
            page.select_option("#prompt", args.prompt)
            page.wait_for_selector("#trajectory polyline", timeout=20000)
            if args.clean != "none":
                page.select_option("#clean", args.clean)
                page.wait_for_selector(f"#trajectory[data-clean='{args.clean}']", timeout=20000)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
