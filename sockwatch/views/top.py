"""``sockwatch top``: the live terminal view, with curses.

A sampler thread reads the source and turns samples into frames every
interval; the main thread only reads keys and paints the latest frame, so
keys answer at once even while a sample of a big table is being read. Sorting,
filtering and the choice of view are applied at paint time, on the frame.

curses because it is in the standard library (nothing to install, nothing to
import at start-up beyond ``_curses``), costs almost nothing per frame, and
leaves every cell of an 80x24 screen under our control; see README.md.
"""

from __future__ import annotations

import contextlib
import curses
import gc
import json
import os
import shutil
import sys
import threading
import time
from typing import Any, Iterator, TextIO

from sockwatch.views import top_screen as screen
from sockwatch.views.top_model import Frame, TopModel
from sockwatch.views.top_source import Source

ESC = 27


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for making a frame. A sample of 100k
    connections is half a million new dicts and lists, none in a cycle, and with
    the collector on every object alive was walked again each time its counts
    tripped: a third of each frame at 100k connections (measured)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Sampler:
    """Reads the source every ``state.interval`` in a thread; keeps the latest frame."""

    def __init__(self, source: Source, state: screen.UIState):
        self.source = source
        self.state = state
        self.model = TopModel()
        self.frame: Frame | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0  # time the last sample and model update took
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="top-sampler", daemon=True)

    def step(self) -> Frame:
        t0 = time.perf_counter()
        with collector_paused():
            frame = self.model.update(self.source.sample())
        self.seconds = time.perf_counter() - t0
        self.frame = frame
        return frame

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
                self._wake.wait(self.state.interval)
                self._wake.clear()
        except BaseException as exc:  # shown by the main thread, which then exits
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def now(self) -> None:
        """Sample without waiting out the interval (after the interval changed)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()


# -- non-interactive ------------------------------------------------------------------
def frame_dict(frame: Frame, state: screen.UIState, source: str) -> dict[str, Any]:
    """A frame for scripts: every row of every view, rates per second."""

    def proc(p: Any) -> dict[str, Any]:
        return {"pid": p.pid or None, "process": p.process, "user": p.user,
                "states": dict(p.states), "connections": p.conns,
                "connects_per_s": p.out_s, "accepts_per_s": p.in_s, "fails_per_s": p.fail_s,
                "sent_bytes_per_s": p.tx_s, "received_bytes_per_s": p.rx_s,
                "retransmits_per_s": p.retr_s, "handshake_p50_s": p.hs_p50,
                "handshake_p99_s": p.hs_p99, "rcvq_wait_p50_us": p.rcvq_wait_p50_us,
                "rcvq_wait_max_us": p.rcvq_wait_max_us}

    procs = screen.rows(frame, state, "processes")
    listeners = screen.rows(frame, state, "listeners")
    return {
        "source": source, "window_s": frame.window, "host": proc(frame.host),
        "lost_events": frame.lost, "loss": frame.loss, "probes": frame.modes,
        "processes": [dict(proc(p), sockets=[dict(c.d, sent_bytes_per_s=c.tx_s,
                                                  received_bytes_per_s=c.rx_s)
                                             for c in p.connections]) for p in procs],
        "listeners": [dict(ln.d, established=ln.established, accepts_per_s=ln.accepts_s,
                           accept_wait_p50_us=ln.accept_wait_p50_us) for ln in listeners],
        "latency": frame.latency,
    }


def once(sampler: Sampler, state: screen.UIState, out: TextIO, as_json: bool,
         keep_going: bool) -> None:
    """Two samples an interval apart (rates need a window), then print; repeat
    for ``--json`` without ``--once`` until interrupted."""
    sampler.step()
    while True:
        time.sleep(state.interval)
        frame = sampler.step()
        if as_json:
            json.dump(frame_dict(frame, state, sampler.source.label), out)
            out.write("\n")
        else:
            width = shutil.get_terminal_size((120, 24)).columns
            height = shutil.get_terminal_size().lines if out.isatty() else None
            if state.view == "connections" and state.pid is None:
                state.pid = _busiest(frame)
            out.write(screen.plain(screen.render(frame, sampler.source.label, state, width,
                                                 height)))
        out.flush()
        if not keep_going:
            return


def _busiest(frame: Frame) -> int | None:
    """The pid with the most connections (what --view connections shows without --pid)."""
    procs = [p for p in frame.processes if p.pid]
    return max(procs, key=lambda p: p.conns).pid if procs else None


# -- interactive ----------------------------------------------------------------------
class App:
    """Keys -> UIState; paints the sampler's latest frame."""

    def __init__(self, scr: Any, sampler: Sampler, state: screen.UIState, color: bool):
        self.scr = scr
        self.sampler = sampler
        self.state = state
        self.shown: Frame | None = None
        self.styles = self._styles(color)

    @staticmethod
    def _styles(color: bool) -> dict[str, int]:
        styles = {"": curses.A_NORMAL, "title": curses.A_BOLD, "head": curses.A_REVERSE,
                  "sort": curses.A_REVERSE | curses.A_BOLD, "sel": curses.A_REVERSE,
                  "key": curses.A_BOLD, "dim": curses.A_NORMAL}
        if color and curses.has_colors():
            curses.start_color()
            curses.use_default_colors()
            curses.init_pair(1, curses.COLOR_CYAN, -1)
            curses.init_pair(2, curses.COLOR_BLACK, curses.COLOR_GREEN)
            curses.init_pair(3, curses.COLOR_BLACK, curses.COLOR_CYAN)
            styles.update(title=curses.color_pair(1) | curses.A_BOLD,
                          head=curses.color_pair(2), sort=curses.color_pair(3) | curses.A_BOLD,
                          dim=curses.color_pair(1))
        return styles

    def paint(self) -> None:
        if not self.state.paused or self.shown is None:
            self.shown = self.sampler.frame
        h, w = self.scr.getmaxyx()
        lines = screen.render(self.shown, self.sampler.source.label, self.state, w, h)
        self.scr.erase()
        for y, line in enumerate(lines[:h]):
            x = 0
            for text, style in line:
                # the bottom-right cell cannot be written without scrolling
                room = w - x - (1 if y == h - 1 else 0)
                if room <= 0:
                    break
                try:
                    self.scr.addnstr(y, x, text, room, self.styles.get(style, 0))
                except curses.error:
                    pass  # a resize raced this paint; the next one fixes it
                x += len(text)
            if line and line[0][1] == "sel":
                try:
                    self.scr.chgat(y, 0, w - 1 if y < h - 1 else w - 1, self.styles["sel"])
                except curses.error:
                    pass
        self.scr.noutrefresh()
        curses.doupdate()

    def rows(self) -> list[Any]:
        return screen.rows(self.shown, self.state) if self.shown else []

    def move(self, delta: int) -> None:
        view = self.state.view
        n = len(self.rows())
        self.state.selected[view] = max(0, min(n - 1, self.state.selected.get(view, 0) + delta))

    def open_selected(self) -> None:
        st = self.state
        if st.view != "processes":
            return
        items = self.rows()
        if items:
            st.pid = items[min(st.selected.get("processes", 0), len(items) - 1)].pid
            st.view = "connections"
            st.selected["connections"] = 0

    def key(self, ch: int) -> bool:
        """Apply one key; False to quit."""
        st = self.state
        if st.help:
            st.help = 2 if st.help == 1 and ch in (ord("?"), ord("h")) else 0
            return True
        if st.editing:
            if ch in (curses.KEY_ENTER, 10, 13):
                st.editing = False
            elif ch == ESC:
                st.editing, st.filter = False, ""
            elif ch in (curses.KEY_BACKSPACE, 127, 8):
                st.filter = st.filter[:-1]
            elif 32 <= ch < 127:
                st.filter += chr(ch)
            st.selected[st.view] = 0
            return True
        page = max(1, self.scr.getmaxyx()[0] - 7)
        moves = {curses.KEY_UP: -1, curses.KEY_DOWN: 1, ord("k"): -1, ord("j"): 1,
                 curses.KEY_PPAGE: -page, curses.KEY_NPAGE: page,
                 curses.KEY_HOME: -1 << 30, curses.KEY_END: 1 << 30}
        views = {ord("1"): "processes", ord("2"): "connections", ord("3"): "listeners",
                 ord("4"): "latency"}
        if ch in (ord("q"), ord("Q")):
            return False
        if ch in moves:
            self.move(moves[ch])
        elif ch in (curses.KEY_ENTER, 10, 13, curses.KEY_RIGHT):
            self.open_selected()
        elif ch in (ESC, curses.KEY_BACKSPACE, 127, curses.KEY_LEFT):
            st.view = "processes"
        elif ch in views:
            if views[ch] == "connections" and st.view == "processes":
                self.open_selected()
            elif views[ch] != "connections" or st.pid is not None:
                st.view = views[ch]
        elif ch == ord("<"):
            st.sort_by(-1)
        elif ch == ord(">"):
            st.sort_by(1)
        elif ch == ord("r"):
            st.reverse()
        elif ch == ord("/"):
            st.editing = True
        elif ch == ord("c"):
            st.filter = ""
        elif ch == ord(" "):
            st.paused = not st.paused
        elif ch in (ord("+"), ord("=")):
            st.faster(1)
            self.sampler.now()
        elif ch == ord("-"):
            st.faster(-1)
            self.sampler.now()
        elif ch in (ord("?"), ord("h"), curses.KEY_F1):
            st.help = 1
        return True

    def loop(self) -> None:
        scr = self.scr
        scr.timeout(200)  # repaint at least this often (new frames, the clock)
        while True:
            if self.sampler.error is not None:
                raise self.sampler.error
            self.paint()
            ch = scr.getch()
            if ch == curses.KEY_RESIZE:
                curses.update_lines_cols()
                continue
            if ch != -1 and not self.key(ch):
                return


def interactive(sampler: Sampler, state: screen.UIState) -> None:
    color = "NO_COLOR" not in os.environ

    def main(scr: Any) -> None:
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal that cannot hide its cursor shows it
        App(scr, sampler, state, color).loop()

    os.environ.setdefault("ESCDELAY", "25")  # Esc answers at once, not after a second
    # The terminal's own size: ncurses prefers LINES/COLUMNS when set (a parent
    # shell or test runner may have left them), and they would pin it across resizes.
    os.environ.pop("LINES", None)
    os.environ.pop("COLUMNS", None)
    sampler.start()
    try:
        curses.wrapper(main)  # restores the terminal on any exit, Ctrl-C included
    except KeyboardInterrupt:
        pass
    finally:
        sampler.stop()


def run(source: Source, state: screen.UIState, once_only: bool, as_json: bool,
        out: TextIO = sys.stdout) -> None:
    sampler = Sampler(source, state)
    if once_only or as_json:
        once(sampler, state, out, as_json, keep_going=as_json and not once_only)
    else:
        interactive(sampler, state)
