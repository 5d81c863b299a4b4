"""The chat page at `/`, in headless Chromium against a real `llmkit serve`: a person types, presses Send, and
watches the answer stream in. The answer must be the model's own (greedy: the same text the API gives), and the
page must load nothing from outside the server."""

from __future__ import annotations

import pytest

from helpers_serve import running_server, tiny_chat_run

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tiny_chat_run(tmp_path_factory.mktemp("page-run") / "tiny", block_size=128, seed=1)
    with running_server(run, tmp_path_factory.mktemp("page-log"), "--served-model-name", MODEL) as s:
        yield s


@pytest.mark.slow
@pytest.mark.browser
def test_chat_page_streams_an_answer(server, browser_page, tmp_path):
    page = browser_page
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_function(f"document.getElementById('model').textContent === {MODEL!r}")
    page.locator("summary").click()  # the settings: greedy decoding makes the answer checkable
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    message = "Good morrow, sweet lord."
    page.fill("#input", message)
    # Count the page's DOM changes: a streamed answer is appended event by event, a buffered one set once (with the
    # two messages, the answer's span and its footer: 5 changes). Records, not observer calls: a fast server's
    # events can all arrive in one network read, and the observer reports one task's changes in one call.
    page.evaluate("""window.pieces = 0; new MutationObserver((records) => window.pieces += records.length).observe(
        document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    text = answer.locator(".text").text_content()
    status, want = server.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 24, "temperature": 0,
                                                        "messages": [{"role": "user", "content": message}]})
    assert status == 200
    assert text and text == want["choices"][0]["message"]["content"]
    assert page.locator(".msg.user").last.text_content() == message
    assert answer.get_attribute("data-finish") == want["choices"][0]["finish_reason"]
    assert page.locator("#status").text_content() == ""
    assert page.evaluate("window.pieces") > 5
    assert all(url.startswith(server.url) for url in requests), requests  # nothing from the internet
    assert "/v1/chat/completions" in " ".join(requests)
