"""Echo guard: the bot's own voice coming back on the caller's line must not be a barge-in.

On a speakerphone (or a leaky handset) the caller's microphone picks up what the bot says and
sends it back to us, delayed and quieter (typically 10–25 dB down). Silero hears speech in it,
and a naive bot interrupts itself. We know exactly what we sent, so we cancel it:

- every frame of bot audio sent (`far_end`) is laid on a "playback" timeline (audio plays in
  order, in real time, from when it is sent or when the previous audio ends, whichever is
  later; Twilio plays `media` in order);
- every `refit_ms`, the delay from playback to the caller's channel is found by
  cross-correlating the last half second of caller audio with the playback timeline, and a
  short FIR filter (the echo path: speaker, room, microphone) is fitted there by least squares;
- each caller frame then has the predicted echo subtracted (`process`). What is left is the
  caller; when the frame was nearly all echo (the prediction explains it to `suppress_db`),
  the leftover is attenuated further (like the non-linear stage of a telephone echo canceller);
- until the first fit (the start of a call's first reply), and while the fit is poor (the
  delay moved: network jitter, or our own backlog of inbound frames), an adaptive threshold
  stands in: a frame quieter than the recent bot audio minus `min_erl_db` is attenuated; a
  caller talking over the bot is louder than its echo and passes. If no echo has been found
  after `converge_s` of bot audio, the line has none (a handset) and the threshold is lifted,
  so a quiet caller is never muted.

When the bot is silent the guard passes audio through untouched and costs nothing. It is a
small canceller for short echo paths (a few ms of reverberation), not a full acoustic echo
canceller; long room tails are left to the barge-in policy (`pipeline.backchannel`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

RATE = 8000
MIN_FIT_DB = 6.0  # a fitted echo path must explain at least this much of the caller's audio
QUIET = 10 ** (-55 / 10)  # mean square below -55 dBFS: nothing to learn an echo path from
CHECK_MS = 160  # before convergence: how much recent caller audio must follow the bot's
# On a line that has shown no echo, while the caller talks over (or right after) the bot: look
# for an echo every this many `refit_ms` (300 ms) rather than every one.
QUIET_LINE_LOOKS = 3
_SCALE = np.float32(1.0 / 32768.0)


@dataclass(slots=True)
class EchoStats:
    """What the guard saw on this call (for events and the benchmark)."""

    frames: int = 0
    cancelled_frames: int = 0
    gated_frames: int = 0
    delay_ms: float | None = None
    correlation: float = 0.0
    last_erle_db: float = 0.0


class EchoGuard:
    """Cancels the bot's own audio from one call's inbound audio (8 kHz int16 frames)."""

    def __init__(
        self,
        max_delay_ms: int = 600,
        early_ms: int = 250,
        taps: int = 48,
        fit_ms: int = 384,
        refit_ms: int = 100,
        min_correlation: float = 0.35,
        suppress_db: float = 10.0,
        min_erl_db: float = 10.0,
        refit_below_db: float = 6.0,
        converge_s: float = 1.5,
        history_s: float = 3.0,
    ) -> None:
        self.max_delay = int(max_delay_ms * RATE / 1000)
        # Our timeline can run ahead of the caller's (frames we receive in a burst after a
        # stall move it on faster than their phone played): look that far "into the future".
        self.early = int(early_ms * RATE / 1000)
        self.taps = taps
        self.pre = 6  # taps before the correlation peak (the path is not a pure delay)
        self.fit = int(fit_ms * RATE / 1000)
        self.check = int(CHECK_MS * RATE / 1000)  # caller audio tested against the bot's
        self.refit = int(refit_ms * RATE / 1000)
        self.min_correlation = min_correlation
        self.suppress_db = suppress_db
        self.min_erl_db = min_erl_db
        self.refit_below_db = refit_below_db
        self.converge = int(converge_s * RATE)
        self._far_total = 0
        self.size = int(history_s * RATE)
        # Both timelines are in inbound sample indices (the caller's clock: 8000 a second from
        # the start of the stream): `near_end` is how many inbound samples have arrived;
        # playback positions are mapped onto the same axis by the wall time audio is sent.
        self._ref = np.zeros(self.size, dtype=np.float32)
        # The caller's side as it came (int16): scaled to float only where a refit or a check
        # reads it, not on every frame (most frames arrive while the bot is not recent).
        self._near = np.zeros(self.size, dtype=np.int16)
        self.near_end = 0
        self._play_end = 0  # inbound-sample index where queued bot audio stops playing
        self._since_fit = 0
        self._caller_talking = False  # the last refit found no echo in what the caller sent
        self._filter: np.ndarray | None = None
        self._lag = 0
        self.stats = EchoStats()

    # Timeline ------------------------------------------------------------------------------
    @staticmethod
    def _index_at(at: float) -> int:
        return round(at * RATE)

    def _write(self, buffer: np.ndarray, start: int, samples: np.ndarray) -> None:
        """Lay `samples` on the ring from timeline index `start`: one or two slice copies
        (this runs for every frame; an index array per frame costs more than the copy)."""
        n = samples.size
        if n > self.size:  # only the newest `size` samples survive on the ring anyway
            samples = samples[n - self.size:]
            start += n - self.size
            n = self.size
        at = start % self.size
        first = min(n, self.size - at)
        buffer[at:at + first] = samples[:first]
        if first < n:
            buffer[:n - first] = samples[first:]

    def _fill(self, buffer: np.ndarray, start: int, end: int, value: float = 0.0) -> None:
        """Set timeline [start, end) of the ring to `value` (silence) without allocating."""
        n = min(end - start, self.size)
        if n <= 0:
            return
        at = (end - n) % self.size
        first = min(n, self.size - at)
        buffer[at:at + first] = value
        if first < n:
            buffer[:n - first] = value

    def far_end(self, pcm8k: np.ndarray, at: float) -> None:
        """Bot audio (8 kHz int16) was sent `at` seconds after the stream started.

        Wall time, not "inbound frames processed so far": when we fall behind on the caller's
        frames and catch up in a burst, the count jumps, the caller's phone does not."""
        if pcm8k.size == 0:
            return
        start = max(self._index_at(at), self._play_end, self.near_end - self.size // 2)
        # Silence between replies: clear what is left of older audio up to `start`.
        if start > self._play_end:
            self._fill(self._ref, max(self._play_end, start - self.size), start)
        self._write(self._ref, start, pcm8k * np.float32(1.0 / 32768.0))
        self._far_total += pcm8k.size
        self._play_end = start + pcm8k.size

    def drop_unplayed(self) -> None:
        """The bot's queued audio was cleared: what was not played yet will never echo."""
        if self._play_end > self.near_end:
            self._fill(self._ref, self.near_end, self._play_end)
            self._play_end = self.near_end

    @property
    def bot_recent(self) -> bool:
        """Bot audio played recently enough to still be echoing."""
        return self._play_end + self.max_delay + self.taps > self.near_end - self.refit

    def _span(self, buffer: np.ndarray, start: int, end: int) -> np.ndarray:
        """A copy of timeline [start, end) from the ring (one slice unless it wraps)."""
        at = start % self.size
        n = end - start
        if at + n <= self.size:
            return buffer[at:at + n].copy()
        if n <= self.size:
            return np.concatenate((buffer[at:], buffer[:n - (self.size - at)]))
        return buffer[np.arange(start, end) % self.size]

    def _near_span(self, start: int, end: int) -> np.ndarray:
        """The caller's side for timeline [start, end), scaled to float32 [-1, 1)."""
        return np.multiply(self._span(self._near, start, end), _SCALE, dtype=np.float32)

    def _reference(self, start: int, end: int) -> np.ndarray:
        """Bot audio on the timeline for [start, end); nothing past what has been queued."""
        ref = self._span(self._ref, start, end)
        if end > self._play_end:
            ref[max(0, self._play_end - start):] = 0.0
        return ref

    # Cancelling ----------------------------------------------------------------------------
    def _advance(self, start: int, n: int) -> bool | None:
        """Inbound samples [start, start + n) have arrived: move the timeline on and refit
        when due. None while the bot is not recent; otherwise whether the line has shown no
        echo (long enough to have found one without finding it: a handset)."""
        self.near_end = start + n
        if self._play_end < start - self.size // 2:
            self._play_end = start - self.size // 2  # keep the timeline's gap bounded
        if not self.bot_recent:
            return None
        self._since_fit += n
        no_echo = self._filter is None and self._far_total - (self._play_end - start) > self.converge
        # Until the first fit, look at every frame (the first words of a reply); once the line
        # has shown no echo, or the last look found the caller talking rather than an echo,
        # every `refit` is soon enough to notice one appearing (each look is an FFT
        # correlation: a caller talking over a greeting made one per frame). On a line that
        # has shown no echo (a handset, most calls), while the caller talks, every
        # `QUIET_LINE_LOOKS`th: the caller's voice hides an echo from the look anyway.
        if self._filter is not None:
            due = self.refit
        elif no_echo:
            due = self.refit * (QUIET_LINE_LOOKS if self._caller_talking else 1)
        else:
            due = self.refit if self._caller_talking else n
        if self._since_fit >= due:
            self._since_fit = 0
            self._refit()
        return no_echo

    def process(self, pcm8k: np.ndarray, frames: int = 1) -> np.ndarray:
        """One inbound frame (8 kHz int16) → the same frame with the bot's echo removed.

        `frames` > 1: a block of that many equal frames, every one of them quiet (all samples
        within -55 dBFS), or the bot not recent at its start (`Conversation.hear`): nothing to
        remove, so it comes back as it is, but the timeline and the refits advance frame by
        frame, exactly as one by one."""
        n = pcm8k.size
        start = self.near_end
        self._write(self._near, start, pcm8k)
        self.stats.frames += frames
        if frames > 1:
            step = n // frames
            for at in range(start, start + n, step):
                if self._advance(at, step) is None:
                    # Not recent, and less so frame by frame: straight to the block's end.
                    self._advance(start + n - step, step)
                    break
            return pcm8k
        no_echo = self._advance(start, n)
        if no_echo is None:
            return pcm8k  # the echo path stays known for the next reply
        near = np.multiply(pcm8k, _SCALE, dtype=np.float32)
        e_near = float(np.dot(near, near)) + 1e-12
        if e_near <= QUIET * n:
            # Too quiet to hold an echo the VAD could hear. Subtracting a prediction from it
            # would only add the bot's voice (a muted line while the bot talks).
            return pcm8k
        if self._filter is None:
            if no_echo:
                return pcm8k
            return self._gate_unconverged(pcm8k, near, start)
        predicted = self._predict(start, n)
        residual = near - predicted
        e_res = float(np.dot(residual, residual)) + 1e-12
        erle = 10.0 * np.log10(e_near / e_res)
        self.stats.last_erle_db = erle
        if erle < self.refit_below_db and e_near > QUIET * n:
            # Poorly explained: the delay may be moving (look again soon) and, until the
            # fit catches up, a frame as quiet as an echo is treated as one.
            self._since_fit = max(self._since_fit, self.refit - 2 * n)
            gated = self._gate_unconverged(pcm8k, near, start)
            if gated is not pcm8k:
                return gated
            if erle < 0.0:
                return pcm8k  # the prediction would add sound: trust the caller
        if erle >= self.suppress_db:
            residual *= 0.1
            self.stats.cancelled_frames += 1
        return np.clip(residual * 32768.0, -32768, 32767).astype(np.int16)

    def _gate_unconverged(self, pcm8k: np.ndarray, near: np.ndarray, start: int) -> np.ndarray:
        """Before the echo path is known (the first words of a call's first reply): a frame
        quieter than the loudest recent bot audio minus `min_erl_db` may be its echo, so it
        is attenuated, unless what the caller's side sent lately does not follow the bot's
        audio at any delay (a soft-spoken caller on a handset line, talking over the bot's
        first words: muting them delayed a barge-in by a third of a second). A caller
        talking louder than that passes anyway."""
        recent = self._reference(start - self.max_delay, start + near.size)
        frames = recent[: recent.size // near.size * near.size].reshape(-1, near.size)
        loudest = float(np.max(np.mean(frames**2, axis=1))) if frames.size else 0.0
        level = float(np.mean(near**2))
        if loudest > QUIET and level < loudest * 10 ** (-self.min_erl_db / 10):
            if level > QUIET and not self._follows_the_bot(start + near.size):
                return pcm8k
            self.stats.gated_frames += 1
            return (pcm8k * 0.05).astype(np.int16)
        return pcm8k

    def _follows_the_bot(self, end: int) -> bool:
        """Does the caller's side over the last `check` samples correlate with the bot's
        audio at some delay, as its echo would (however the line filters it)?"""
        n = min(self.check, end)
        near = self._near_span(end - n, end)
        ref = self._reference(end - n - self.max_delay, end + self.early)
        if float(np.dot(ref, ref)) < QUIET * n:
            return False
        return _best_lag(near, ref, self.max_delay, self.early)[1] >= self.min_correlation

    def _first_tap(self, start: int) -> int:
        """Timeline index of the oldest reference sample the filter uses for inbound
        sample `start` (at the current lag)."""
        return start - self._lag - (self.taps - self.pre) + 1

    def _matrix(self, start: int, n: int) -> np.ndarray:
        """Reference rows for inbound samples [start, start + n): one column per tap."""
        first = self._first_tap(start)
        ref = self._reference(first, start + n - self._lag + self.pre)
        windows = np.lib.stride_tricks.sliding_window_view(ref, self.taps)
        return windows[:n]

    def _predict(self, start: int, n: int) -> np.ndarray:
        assert self._filter is not None
        return self._matrix(start, n) @ self._filter

    def _refit(self) -> None:
        self._caller_talking = False
        end = self.near_end
        fit = min(self.fit, end)
        if fit < self.fit // 2:
            self._filter = None
            return
        near = self._near_span(end - fit, end)
        if float(np.dot(near, near)) < QUIET * fit:
            return  # too quiet to learn from (no echo yet, or none at all): keep what we have
        ref = self._reference(end - fit - self.max_delay, end + self.early)
        if float(np.dot(ref, ref)) < QUIET * fit:
            return
        lag, corr = _best_lag(near, ref, self.max_delay, self.early)
        self.stats.correlation = corr
        if corr < self.min_correlation:
            self._caller_talking = True
            return  # the caller is talking (or the path changed): keep the last good fit
        previous = self._lag
        self._lag = lag
        first = self._first_tap(end - fit)
        solution, left = _fit_fir(self._reference(first, first + fit + self.taps - 1), near)
        if left > float(np.dot(near, near)) * 10 ** (-MIN_FIT_DB / 10):
            self._lag = previous  # explains too little to be our echo: keep the last fit
            return
        self.stats.delay_ms = lag * 1000 / RATE
        self._filter = solution.astype(np.float32)


def _fit_fir(ref: np.ndarray, near: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares FIR filter `w` (taps = ref.size - near.size + 1) with
    near[k] ≈ sum_i ref[k + i] w[i], and the energy left unexplained.

    By the normal equations, from correlations: the Gram matrix of the sliding windows is
    Toeplitz plus corrections at its edges, so it is built from one correlation and a
    cumulative sum in float64, never as a (samples × taps) matrix product. That keeps a refit
    at a fraction of a millisecond and off multithreaded BLAS (`lstsq` on the full matrix
    took milliseconds, and far longer when BLAS threads fought the event loop for a core).
    A ridge at the level of `lstsq`'s default cutoff stands in for its rank handling (a
    pure tone from the bot makes the matrix rank-deficient).
    """
    n = near.size
    taps = ref.size - n + 1
    r = ref.astype(np.float64)
    y = near.astype(np.float64)
    first_row = np.correlate(r, r[:n], "valid")  # G[0, d] = sum_k r[k] r[k + d]
    rhs = np.correlate(r, y, "valid")  # b[i] = sum_k r[k + i] y[k]
    # G[i + 1, j + 1] = G[i, j] - r[i] r[j] + r[n + i] r[n + j]: along each diagonal the
    # entries differ by a running sum of these edge terms.
    grid = _grid(taps)
    head, tail = r[: taps - 1], r[n : n + taps - 1]
    steps = np.zeros(taps * taps, dtype=np.float64)
    steps[grid.step_at] = tail[grid.i] * tail[grid.j] - head[grid.i] * head[grid.j]
    upper = (first_row + np.cumsum(steps.reshape(taps, taps), axis=0)).ravel()
    gram = np.empty(taps * taps, dtype=np.float64)  # upper[i * taps + d] = G[i, i + d]
    gram[grid.upper] = gram[grid.lower] = upper[grid.source]
    gram = gram.reshape(taps, taps)
    gram[np.diag_indices(taps)] += 1e-7 * float(np.trace(gram)) + 1e-20
    solution = np.linalg.solve(gram, rhs)
    # |y - M w|^2 = y.y - 2 w.b + w.G w (the ridge term is negligible here).
    left = float(np.dot(y, y) - 2.0 * np.dot(solution, rhs) + solution @ gram @ solution)
    return solution, max(left, 0.0)


def _best_lag(near: np.ndarray, ref: np.ndarray, max_lag: int, early: int = 0
              ) -> tuple[int, float]:
    """Lag (samples) at which `ref` best explains `near`, and the normalized correlation.

    `ref` starts `max_lag` samples before `near` and ends `early` samples after it: lag L
    (from -early to max_lag) pairs near[i] with ref[max_lag + i - L].
    """
    n = near.size
    span = max_lag + early
    # Lag k reads ref[i + k] for i < n and k <= span: all below ref.size, so a circular
    # correlation over ref.size points has no wrap-around in the lags read here.
    size = _fft_size(ref.size)
    spectrum = np.fft.rfft(ref, size) * np.conj(np.fft.rfft(near, size))
    xcorr = np.fft.irfft(spectrum, size)[: span + 1]  # xcorr[k] = sum near[i] ref[i + k]
    energy = np.cumsum(np.concatenate(([0.0], ref.astype(np.float64) ** 2)))
    window_energy = energy[n : n + span + 1] - energy[: span + 1]
    # Windows of the reference that are (nearly) silent cannot explain anything.
    window_energy = np.maximum(window_energy, 0.05 * float(window_energy.max()) + 1e-12)
    norm = np.sqrt(window_energy * float(np.dot(near, near))) + 1e-12
    score = np.abs(xcorr) / norm
    k = int(np.argmax(score))
    return max_lag - k, float(score[k])


@functools.cache
def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n, a size the FFT is fast at (for a refit's 9,872 points:
    10,000, a third of the time of the next power of two, 16,384)."""
    best = 1 << (n - 1).bit_length()
    fives = 1
    while fives < best:
        threes = fives
        while threes < best:
            size = threes
            while size < n:
                size *= 2
            best = min(best, size)
            threes *= 3
        fives *= 5
    return best


@dataclass(frozen=True, slots=True)
class _Grid:
    """Flat indices for building a taps × taps Gram matrix from its diagonals (`_fit_fir`)."""

    i: np.ndarray  # edge terms: row i, column j = i + d, for i + d < taps - 1
    j: np.ndarray
    step_at: np.ndarray  # where each edge term goes: (i + 1, d)
    source: np.ndarray  # G[i, i + d] for i + d < taps, in (i, d) layout
    upper: np.ndarray  # ... and where it goes, above the diagonal and mirrored below it
    lower: np.ndarray


_GRIDS: dict[int, _Grid] = {}


def _grid(taps: int) -> _Grid:
    grid = _GRIDS.get(taps)
    if grid is None:
        rows, diag = (a.ravel() for a in np.indices((taps, taps)))
        step = rows + diag < taps - 1
        keep = rows + diag < taps
        i, d = rows[keep], diag[keep]
        grid = _GRIDS[taps] = _Grid(
            i=rows[step], j=rows[step] + diag[step], step_at=(rows[step] + 1) * taps + diag[step],
            source=i * taps + d, upper=i * taps + i + d, lower=(i + d) * taps + i)
    return grid
