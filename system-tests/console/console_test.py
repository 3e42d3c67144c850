"""The operator console in a real browser: headless Chromium (Debian's
`chromium`), driven by Playwright for Python, against a running imgflow
(the API and a worker on PostgreSQL and Redis) that
`system-tests/tests/console.rs` starts and then checks further.

Settings come from the environment:
  IMGFLOW_URL       the API's base URL (AUTH_REQUIRED=true)
  ADMIN_TOKEN       the API's admin token
  CLIENT_KEY        a client key
  PHOTO             a photo to try filters on
  INVERT_WASM       the example plugin, 0.1.0
  INVERT_V2_WASM    the same plugin, 0.2.0
  HOSTILE_WASM      the test plugin whose texts hold markup
  SIGMA             the blur sigma to submit (the Rust test runs the same
                    job with curl and compares the pixels)
  SCREENSHOTS       where to save a screenshot of each page
  CHROMIUM          the browser (default /usr/bin/chromium)

It prints one JSON line at the end: the ids of the jobs it submitted, for
the Rust test to compare, and how long each part took.
"""

import base64
import json
import os
import re
import sys
import time

from playwright.sync_api import expect, sync_playwright

URL = os.environ["IMGFLOW_URL"]
ADMIN_TOKEN = os.environ["ADMIN_TOKEN"]
CLIENT_KEY = os.environ["CLIENT_KEY"]
PHOTO = os.environ["PHOTO"]
SHOTS = os.environ["SCREENSHOTS"]
SIGMA = os.environ.get("SIGMA", "3")
TIMEOUT_MS = 20_000

expect.set_options(timeout=TIMEOUT_MS)
timings = {}
problems = []  # console errors and CSP reports: the page must have none


def step(name):
    """Times a part of the test."""

    class Timer:
        def __enter__(self):
            self.start = time.monotonic()
            print(f"--- {name}", flush=True)

        def __exit__(self, *exc):
            timings[name] = round(time.monotonic() - self.start, 2)

    return Timer()


def shot(page, name):
    page.evaluate("() => { document.getElementById('toast').textContent = ''; }")
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def console_message(message):
    # Chromium logs each 4xx answer as an error; the tests cause those on
    # purpose. Anything else (a CSP violation, a script error) is a problem.
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        problems.append(f"console: {message.text}")


def watch(page):
    page.on("console", console_message)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: d.accept())


def drop(page, target, path, mime):
    """Drops the file at `path` on `target`, as a drag from the desktop does."""
    data = base64.b64encode(open(path, "rb").read()).decode()
    transfer = page.evaluate_handle(
        """([b64, name, type]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type }));
            return transfer;
        }""",
        [data, os.path.basename(path), mime],
    )
    page.dispatch_event(target, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(target, "drop", {"dataTransfer": transfer})


def sign_in(page, credential):
    page.goto(f"{URL}/console#/signin")
    field = page.get_by_label("Client key or admin token")
    expect(field).to_be_focused()
    expect(field).to_have_attribute("type", "password")
    # By keyboard only: type, Enter.
    page.keyboard.type(credential)
    page.keyboard.press("Enter")
    expect(page.locator("#role")).not_to_have_attribute("data-role", "none")


def number(page, selector):
    return int(page.locator(selector).inner_text())


def check_labels(page, where):
    """Every visible input and select has a label (or an aria-label)."""
    unlabelled = page.evaluate(
        """() => Array.from(document.querySelectorAll('input, select'))
              .filter(el => el.type !== 'hidden' && el.offsetParent !== null)
              .filter(el => el.labels.length === 0 && !el.getAttribute('aria-label'))
              .map(el => el.id || el.name)"""
    )
    assert not unlabelled, f"{where}: inputs without a label: {unlabelled}"


def check_fits(page, where):
    """Nothing is wider than the window (no sideways scrolling)."""
    width = page.evaluate("() => document.documentElement.scrollWidth")
    inner = page.evaluate("() => window.innerWidth")
    assert width <= inner + 1, f"{where}: page is {width}px wide in a {inner}px window"


def main():
    result = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-dev-shm-usage"],
            headless=True,
        )
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        watch(page)

        with step("sign in"):
            response = page.goto(URL + "/")
            assert page.url.endswith("/console#/signin") or page.url.endswith("/console"), page.url
            csp = response.headers.get("content-security-policy", "")
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
            expect(page.locator("#signin-form")).to_be_visible()
            shot(page, "signin")
            page.get_by_label("Client key or admin token").fill("not-a-key")
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator("#signin-error")).to_contain_text("unauthorized")
            sign_in(page, ADMIN_TOKEN)
            expect(page.locator("#role")).to_have_attribute("data-role", "admin")
            # The credential is in an HttpOnly cookie: no script can read it.
            assert ADMIN_TOKEN not in page.evaluate("() => document.cookie")
            stored = page.evaluate("() => JSON.stringify(sessionStorage) + JSON.stringify(localStorage)")
            assert ADMIN_TOKEN not in stored, stored
            cookie = [c for c in context.cookies() if c["name"] == "imgflow_session"][0]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
            assert cookie["expires"] == -1, f"a session cookie, gone when the browser closes: {cookie}"

        with step("overview"):
            page.goto(f"{URL}/console#/overview")
            expect(page.locator("#ov-completed")).to_be_visible()
            completed_before = number(page, "#ov-completed")
            expect(page.locator("#ov-workers")).to_have_text("1")
            shot(page, "overview-before")

        with step("plugins: upload, versions, escaping"):
            page.goto(f"{URL}/console#/plugins")
            expect(page.locator("#upload-form")).to_be_visible()
            check_labels(page, "plugins")
            # A file that is not a component: the API's refusal is shown.
            page.locator("#upload-file").set_input_files(PHOTO)
            page.locator("#upload-name").fill("not-a-plugin")
            page.locator("#upload-button").click()
            expect(page.locator("#upload-error")).to_contain_text("not_a_component")
            page.locator("#upload-name").fill("")
            page.locator("#upload-file").set_input_files(os.environ["INVERT_WASM"])
            expect(page.locator("#upload-name")).to_have_value("invert")
            page.locator("#upload-button").click()
            expect(page.locator("#toast")).to_have_text("Uploaded invert 0.1.0")
            expect(page.locator("tr[data-plugin=invert]")).to_be_visible()
            expect(page.locator("tr[data-plugin=invert] td").nth(1)).to_have_text("0.1.0")
            # Built-ins are marked; an upload is not.
            expect(page.locator("tr[data-plugin=blur] .badge.builtin")).to_have_text("built-in")
            expect(page.locator("tr[data-plugin=invert] .badge.builtin")).to_have_count(0)
            # A second version, then roll back to the first and delete the second.
            page.locator("#upload-name").fill("invert")
            page.locator("#upload-file").set_input_files(os.environ["INVERT_V2_WASM"])
            page.locator("#upload-button").click()
            expect(page.locator("#toast")).to_have_text("Uploaded invert 0.2.0")
            expect(page.locator("tr[data-plugin=invert] td").nth(1)).to_have_text("0.2.0")
            page.locator("button.show-versions[data-plugin=invert]").click()
            page.get_by_role("button", name="Activate 0.1.0").click()
            expect(page.locator("#toast")).to_have_text("invert 0.1.0 is active")
            expect(page.locator("tr[data-plugin=invert] td").nth(1)).to_have_text("0.1.0")
            page.locator("button.show-versions[data-plugin=invert]").click()
            page.get_by_role("button", name="Delete 0.2.0").click()
            expect(page.locator("#toast")).to_have_text("invert 0.2.0 deleted")
            page.locator("button.show-versions[data-plugin=invert]").click()
            expect(page.locator("tr.versions:not([hidden]) tr[data-version]")).to_have_count(1)
            # Its limits, under its versions: none, then a cap the operator sets.
            limits = page.locator("tr.versions:not([hidden]) tr[data-limit=max_concurrent]")
            expect(limits).to_contain_text("none of its own")
            page.locator("#limit-invert-max_concurrent").fill("2")
            page.get_by_role("button", name="Save limits").click()
            expect(page.locator("#toast")).to_have_text("Limits of invert saved")
            page.locator("button.show-versions[data-plugin=invert]").click()
            expect(limits).to_contain_text("2 jobs")
            # Markup from an uploader is shown as text and never runs.
            # This one by drag and drop, as a file dragged from the desktop.
            page.locator("#upload-name").fill("")
            drop(page, "#upload-drop", os.environ["HOSTILE_WASM"], "application/wasm")
            expect(page.locator("#upload-chosen")).to_contain_text("hostile_text.wasm")
            expect(page.locator("#upload-name")).to_have_value("hostile-text")
            page.locator("#upload-button").click()
            expect(page.locator("#toast")).to_have_text("Uploaded hostile-text 0.1.0")
            row = page.locator("tr[data-plugin=hostile-text]")
            expect(row).to_be_visible()
            expect(row.locator(".plugin-description")).to_contain_text("<script>document.title='pwned'</script>")
            expect(row).to_contain_text("<b>pass</b> or fail")
            assert row.locator("script, img, b").count() == 0, "markup was parsed"
            assert page.title() != "pwned"
            shot(page, "plugins")

        with step("try a filter: blur"):
            page.goto(f"{URL}/console#/try?plugin=blur")
            sigma = page.locator("#step1-sigma")
            expect(sigma).to_have_attribute("type", "number")
            expect(sigma).to_have_value(re.compile(r"^[0-9.]+$"))
            maximum = float(sigma.get_attribute("max"))
            check_labels(page, "try")
            page.locator("#try-file").set_input_files(PHOTO)
            expect(page.locator("#try-before")).to_be_visible()
            # Outside its declared range: refused in the page, nothing sent.
            sigma.fill(str(maximum * 10))
            page.locator("#try-run").click()
            expect(page.locator("#try-error")).to_contain_text("sigma")
            expect(page.locator("#try-status")).to_have_text("")
            sigma.fill(SIGMA)
            page.locator("#try-run").click()
            expect(page.locator("#try-status [data-status=completed]")).to_be_visible()
            after = page.locator("#try-after")
            expect(after).to_be_visible()
            page.wait_for_function("() => document.getElementById('try-after').naturalWidth > 0")
            expect(page.locator("#try-download")).to_be_visible()
            with page.expect_download() as download:
                page.locator("#try-download").click()
            saved = os.path.join(SHOTS, "downloaded-result.png")
            download.value.save_as(saved)
            result["downloaded"] = saved
            result["blur_job"] = page.locator("#try-status code").first.inner_text()
            shot(page, "try")

        with step("try a filter: a generated form, a failing job"):
            page.goto(f"{URL}/console#/try?plugin=hostile-text")
            expect(page.locator("#step1-mode option")).to_have_text(["pass", "fail"])
            expect(page.locator("#step1-mode")).to_have_value("pass")
            expect(page.locator("#step1-keep_alpha")).to_be_checked()
            expect(page.locator("#step1-strength")).to_have_value("5")
            expect(page.locator("#step1-amount-slider")).to_have_attribute("type", "range")
            page.locator("#try-file").set_input_files(PHOTO)
            # 0 is outside (0, 10]: the exclusive bound is refused too.
            page.locator("#step1-strength").fill("0")
            page.locator("#try-run").click()
            expect(page.locator("#try-error")).to_contain_text("greater than 0")
            page.locator("#step1-strength").fill("7")
            page.locator("#step1-mode").select_option("fail")
            page.locator("#try-run").click()
            expect(page.locator("#try-status [data-status=failed]")).to_be_visible()
            expect(page.locator("#try-status .job-error-code")).to_have_text("plugin_failed")
            expect(page.locator("#try-status .job-error-message")).to_contain_text("<script>")
            assert page.title() != "pwned"
            result["failed_job"] = page.locator("#try-status code").first.inner_text()
            shot(page, "try-failed")

        with step("try a filter: a pipeline"):
            page.goto(f"{URL}/console#/try?plugin=grayscale")
            page.locator("#try-file").set_input_files(PHOTO)
            page.locator("#try-add-step").click()
            page.locator("select.step-plugin").nth(1).select_option("invert")
            page.locator("#try-run").click()
            expect(page.locator("#try-status [data-status=completed]")).to_be_visible()
            result["pipeline_job"] = page.locator("#try-status code").first.inner_text()

        with step("cancel a running job"):
            # `sleep` sleeps until the job's deadline: it is running until cancelled.
            page.goto(f"{URL}/console#/try?plugin=sleep")
            page.locator("#try-file").set_input_files(PHOTO)
            page.locator("#try-run").click()
            expect(page.locator("#try-status [data-status=running]")).to_be_visible()
            page.locator("#try-job-link").click()
            page.locator("#job-cancel").click()
            expect(page.locator("#job [data-status=cancelled]")).to_be_visible()
            expect(page.locator("#job-retry")).to_be_visible()
            expect(page.locator("#job-cancel")).to_have_count(0)
            result["cancelled_job"] = page.url.rsplit("/", 1)[1]

        with step("jobs: filter, page, job page"):
            page.goto(f"{URL}/console#/jobs")
            expect(page.locator("#jobs tbody tr")).to_have_count(20)
            check_labels(page, "jobs")
            shot(page, "jobs")
            page.locator("#jobs-older").click()
            expect(page.locator("#jobs-newer")).to_be_visible()
            older = page.locator("#jobs tbody tr").count()
            assert older >= 1, "the second page is empty"
            page.locator("#jobs-newer").click()
            expect(page.locator("#jobs tbody tr")).to_have_count(20)
            page.locator("#jobs-status").select_option("failed")
            page.get_by_role("button", name="Filter").click()
            expect(page.locator("#jobs tbody tr")).to_have_count(1)
            expect(page.locator(f"#jobs tr[data-job='{result['failed_job']}']")).to_be_visible()
            page.locator("#jobs-status").select_option("")
            page.locator("#jobs-action").select_option("blur")
            page.get_by_role("button", name="Filter").click()
            expect(page.locator(f"#jobs tr[data-job='{result['blur_job']}']")).to_be_visible()
            expect(page.locator(f"#jobs tr[data-job='{result['failed_job']}']")).to_have_count(0)
            # The failed job's page: its error, and Retry.
            page.goto(f"{URL}/console#/jobs/{result['failed_job']}")
            expect(page.locator("#job-error-code")).to_have_text("plugin_failed")
            expect(page.locator("#job-error-message")).to_contain_text("failed on purpose")
            expect(page.locator("#job-retry")).to_be_visible()
            page.wait_for_function("() => document.getElementById('job-input').naturalWidth > 0")
            shot(page, "job-failed")
            # The completed job's page: parameters, version, both images.
            page.goto(f"{URL}/console#/jobs/{result['blur_job']}")
            expect(page.locator("#job-steps")).to_contain_text("sigma")
            expect(page.locator("#job-steps")).to_contain_text("0.1.0")
            page.wait_for_function(
                "() => ['job-input', 'job-result'].every(id => document.getElementById(id).naturalWidth > 0)"
            )
            expect(page.locator("#job-cancel")).to_have_count(0)
            shot(page, "job")
            # Retry the failed job from its page, then delete the retry.
            page.goto(f"{URL}/console#/jobs/{result['failed_job']}")
            page.locator("#job-retry").click()
            page.wait_for_url(re.compile(r"#/jobs/(?!" + result["failed_job"] + ")"))
            expect(page.locator("#job")).to_contain_text("Retry of")
            result["retry_job"] = page.url.rsplit("/", 1)[1]
            expect(page.locator("#job [data-status=failed]")).to_be_visible()
            page.locator("#job-delete").click()
            page.wait_for_url(re.compile(r"#/jobs$"))

        with step("overview counts the jobs"):
            page.goto(f"{URL}/console#/overview")
            page.wait_for_function(
                f"() => Number(document.getElementById('ov-completed')?.textContent) > {completed_before}"
            )
            expect(page.locator("#ov-actions tr[data-action=blur] td.completed")).not_to_have_text("0")
            expect(page.locator("#ov-actions tr[data-action=hostile-text] td.failed")).not_to_have_text("0")
            result["completed_before"] = completed_before
            result["completed_after"] = number(page, "#ov-completed")
            shot(page, "overview")

        with step("usage: every key's share and limits"):
            page.goto(f"{URL}/console#/usage")
            expect(page.locator("h1")).to_have_text("Keys: shares and limits")
            expect(page.locator("#keys tr[data-key]").first).to_contain_text("1 (equal)")
            check_labels(page, "usage")

        with step("narrow screen"):
            narrow = browser.new_context(viewport={"width": 390, "height": 844})
            small = narrow.new_page()
            watch(small)
            small.goto(f"{URL}/console#/signin")
            small.get_by_label("Client key or admin token").fill(ADMIN_TOKEN)
            small.get_by_label("Client key or admin token").press("Enter")
            expect(small.locator("#role")).to_have_attribute("data-role", "admin")
            for name in ["overview", "plugins", "try", "jobs", "usage"]:
                small.goto(f"{URL}/console#/{name}")
                small.wait_for_load_state("networkidle")
                check_fits(small, f"{name} at 390px")
            small.goto(f"{URL}/console#/jobs/{result['blur_job']}")
            expect(small.locator("#job-steps")).to_be_visible()
            small.wait_for_function(
                "() => ['job-input', 'job-result'].every(id => document.getElementById(id).naturalWidth > 0)"
            )
            check_fits(small, "job at 390px")
            shot(small, "job-narrow")
            narrow.close()

        with step("keyboard"):
            page.goto(f"{URL}/console#/overview")
            page.reload()
            page.keyboard.press("Tab")  # the skip link
            assert page.evaluate("() => document.activeElement.textContent") == "Skip to content"
            page.keyboard.press("Tab")  # Overview
            page.keyboard.press("Tab")  # Plugins
            focused = page.evaluate("() => document.activeElement.textContent")
            assert focused == "Plugins", focused
            page.keyboard.press("Enter")
            expect(page.locator("h1")).to_have_text("Plugins")

        with step("a client key"):
            page.locator("#sign-out").click()
            expect(page.locator("#role")).to_have_attribute("data-role", "none")
            sign_in(page, CLIENT_KEY)
            expect(page.locator("#role")).to_have_attribute("data-role", "client")
            page.goto(f"{URL}/console#/plugins")
            expect(page.locator("#upload-hint")).to_be_visible()
            expect(page.locator("#upload-form")).to_have_count(0)
            expect(page.locator("#upload-file")).to_have_count(0)
            page.locator("button.show-versions[data-plugin=invert]").click()
            expect(page.locator("tr.versions:not([hidden]) tr[data-version]")).to_have_count(1)
            expect(page.locator("button.activate, button.delete-version")).to_have_count(0)
            shot(page, "plugins-client")
            # Its own usage and limits.
            page.goto(f"{URL}/console#/usage")
            expect(page.locator("#usage")).to_contain_text("Unfinished jobs")
            # It sees its own jobs only: none yet, then the one it submits.
            page.goto(f"{URL}/console#/jobs")
            expect(page.locator("#jobs-empty")).to_be_visible()
            page.goto(f"{URL}/console#/try?plugin=grayscale")
            page.locator("#try-file").set_input_files(PHOTO)
            page.locator("#try-run").click()
            expect(page.locator("#try-status [data-status=completed]")).to_be_visible()
            page.wait_for_function("() => document.getElementById('try-after').naturalWidth > 0")
            result["client_job"] = page.locator("#try-status code").first.inner_text()
            page.goto(f"{URL}/console#/jobs")
            expect(page.locator("#jobs tbody tr")).to_have_count(1)
            # An operator's job is "not found" to it.
            page.goto(f"{URL}/console#/jobs/{result['blur_job']}")
            expect(page.locator("#job-error")).to_contain_text("job_not_found")

        browser.close()

    assert not problems, "the page reported problems:\n" + "\n".join(problems)
    result["timings"] = timings
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # print what failed, then fail
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        raise
