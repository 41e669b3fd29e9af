"""The indicator kernels: per-candle group steps over a per-key state row.

The indicators are split into six groups (moving averages, oscillators, bands,
ranges, flows, candle patterns). Each group step consumes one closed candle for
one key (one row of a float64 state matrix), reads and writes only its own
disjoint slice of that row, and writes only its own output columns. ``step``
runs the groups a mask selects for one candle.

Batch runs ``step`` over a whole history on one state row; streaming runs it
over many rows (keys), one candle each. Train/serve parity therefore holds by
construction: both paths execute the same group steps, the same arithmetic in
the same order. Because groups share nothing but the candle counter and the
previous candle (which ``step`` keeps), batch may run disjoint group masks on
private copies of the state row in parallel threads (``run_series`` releases
the GIL) and the result is bit-identical to running them all in one thread.

Arithmetic follows TA-Lib's C source (0.8.x, the version the TA-Lib 0.8.2 wheel bundles) where TA-Lib has the indicator (seeding,
smoothing order, tie rules), with two deliberate differences, both documented
in docs/features.md:

* window sums (SMA, Bollinger middle, CMF, MFI) are Neumaier-compensated and
  Bollinger's sigma is a two-pass sum over the window, so nothing drifts over
  a stream of millions of candles (TA-Lib keeps plain running sums and a
  running sum of squares);
* TA-Lib's absolute epsilon on price-scaled quantities (``TA_IS_ZERO``, |x| < 1e-14
  in TA-Lib 0.8, on avg gain+loss and smoothed TR) is an exact zero test here: an
  absolute epsilon is a constant in some price unit and misfires on a symbol
  quoted small enough; exact zero means "no movement". They differ only for
  0 < |x| < 1e-14, never seen on real candles.

The state layout is a set of module-level integer offsets (numba freezes them
as compile-time constants).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from libs.indicators.catalog import FEATURE_INDEX, N_FEATURES
from libs.indicators.validation import candle_problem

# ---- groups ----------------------------------------------------------------------------

G_AVERAGES = 1  # sma_*, ema_*, macd*, roc_12, mom_10
G_OSCILLATORS = 2  # rsi_*, stoch_*
G_BANDS = 4  # bb_*, hv_20
G_RANGES = 8  # atr_14, natr_14, kc_*, adx_14, plus/minus_di_14
G_FLOWS = 16  # ohlcv, hl2, obv, vpt, cmf_20, mfi_14, price_change, volume_change
G_PATTERNS = 32  # cdl_*
G_ALL = 63

# ---- state layout ----------------------------------------------------------------------

_next = 0
_owner: list[int] = []  # the group owning each state slot (G_ALL: kept by ``step`` for every group)
_group = G_ALL


def _alloc(n: int = 1) -> int:
    global _next
    start = _next
    _next += n
    _owner.extend([_group] * n)
    return start


T = _alloc()  # candles consumed so far
PO, PH, PL, PC, PV = (_alloc() for _ in range(5))  # previous candle
_group = G_AVERAGES
RING_C = _alloc(256)  # last 256 closes; 256 (a power of two) >= the longest window (200)
SMA10, SMA20, SMA50, SMA100, SMA200 = (_alloc(2) for _ in range(5))  # (sum, compensation)
EMA10, EMA20, EMA50, EMA100, EMA200 = (_alloc() for _ in range(5))
SEED_SUM = _alloc()  # plain left-to-right sum of the first 200 closes (EMA seeds, as TA-Lib)
MACD_FAST, MACD_SLOW, MACD_SIG, MACD_SIGSUM, MACD_SEED = (_alloc() for _ in range(5))
_group = G_OSCILLATORS
RSI14, RSI21 = _alloc(2), _alloc(2)  # (avg gain, avg loss)
RH14, RL14 = _alloc(14), _alloc(14)  # stochastic high/low windows
RFK, RSK = _alloc(3), _alloc(3)  # fast %K, slow %K windows
_group = G_BANDS
RC20 = _alloc(20)  # last 20 closes, Bollinger's window, scanned whole
BB_SUM = _alloc(2)  # compensated sum of RC20 (the same sum as SMA20's)
RLR = _alloc(20)  # last 20 log returns
_group = G_RANGES
ATR14, ATR10 = _alloc(), _alloc()  # TR accumulator, then the ATR
KC_EMA, KC_SEED = _alloc(), _alloc()  # Keltner's EMA20 (the same arithmetic as EMA20's)
ADX_PDM, ADX_MDM, ADX_TR, ADX_SUMDX, ADX_ADX = (_alloc() for _ in range(5))
_group = G_FLOWS
OBV, VPT = _alloc(), _alloc()
CMF_MFV, CMF_VOL = _alloc(2), _alloc(2)
RMFV, RVOL = _alloc(20), _alloc(20)
MFI_POS, MFI_NEG = _alloc(2), _alloc(2)
MFI_NULL = _alloc()  # consecutive flowless candles
RPOS, RNEG = _alloc(14), _alloc(14)
_group = G_PATTERNS
DOJI_HL, HS_BODY, HS_HL, HS_NEAR = (_alloc() for _ in range(4))  # TA-Lib candle totals
RBODY, RHL = _alloc(16), _alloc(16)  # |c-o| and h-l of the last 16 candles
STATE_SIZE = _next
STATE_OWNER = np.array(_owner, dtype=np.int64)


def state_slots(groups: int) -> np.ndarray:
    """Boolean mask of the state slots that only the given groups read and write."""
    return ((STATE_OWNER & groups) != 0) & (STATE_OWNER != G_ALL)


# ---- output columns --------------------------------------------------------------------

F_OPEN, F_HIGH, F_LOW, F_CLOSE, F_VOLUME = (FEATURE_INDEX[n] for n in ("open", "high", "low", "close", "volume"))
F_SMA10, F_SMA20, F_SMA50, F_SMA100, F_SMA200 = (FEATURE_INDEX[f"sma_{n}"] for n in (10, 20, 50, 100, 200))
F_EMA10, F_EMA20, F_EMA50, F_EMA100, F_EMA200 = (FEATURE_INDEX[f"ema_{n}"] for n in (10, 20, 50, 100, 200))
F_RSI14, F_RSI21 = FEATURE_INDEX["rsi_14"], FEATURE_INDEX["rsi_21"]
F_MACD, F_MACDS, F_MACDH = (FEATURE_INDEX[n] for n in ("macd", "macd_signal", "macd_hist"))
F_STK, F_STD = FEATURE_INDEX["stoch_k"], FEATURE_INDEX["stoch_d"]
F_ROC, F_MOM = FEATURE_INDEX["roc_12"], FEATURE_INDEX["mom_10"]
F_BBU, F_BBM, F_BBL, F_BBW, F_BBP = (
    FEATURE_INDEX[n] for n in ("bb_upper", "bb_middle", "bb_lower", "bb_width", "bb_pctb")
)
F_ATR, F_NATR = FEATURE_INDEX["atr_14"], FEATURE_INDEX["natr_14"]
F_ADX, F_PDI, F_MDI = (FEATURE_INDEX[n] for n in ("adx_14", "plus_di_14", "minus_di_14"))
F_KCU, F_KCM, F_KCL = (FEATURE_INDEX[n] for n in ("kc_upper", "kc_middle", "kc_lower"))
F_OBV, F_CMF, F_MFI, F_VPT = (FEATURE_INDEX[n] for n in ("obv", "cmf_20", "mfi_14", "vpt"))
F_HV, F_PCH, F_VCH, F_HL2 = (FEATURE_INDEX[n] for n in ("hv_20", "price_change", "volume_change", "hl2"))
F_HAMMER, F_ENGULF, F_DOJI, F_SSTAR = (
    FEATURE_INDEX[n] for n in ("cdl_hammer", "cdl_engulfing", "cdl_doji", "cdl_shootingstar")
)

# which group writes each output column (batch computes only the groups of the asked features)
_COLUMN_GROUP = {
    G_AVERAGES: (F_SMA10, F_SMA20, F_SMA50, F_SMA100, F_SMA200, F_EMA10, F_EMA20, F_EMA50, F_EMA100, F_EMA200,
                 F_MACD, F_MACDS, F_MACDH, F_ROC, F_MOM),
    G_OSCILLATORS: (F_RSI14, F_RSI21, F_STK, F_STD),
    G_BANDS: (F_BBU, F_BBM, F_BBL, F_BBW, F_BBP, F_HV),
    G_RANGES: (F_ATR, F_NATR, F_ADX, F_PDI, F_MDI, F_KCU, F_KCM, F_KCL),
    G_FLOWS: (F_OPEN, F_HIGH, F_LOW, F_CLOSE, F_VOLUME, F_HL2, F_OBV, F_VPT, F_CMF, F_MFI, F_PCH, F_VCH),
    G_PATTERNS: (F_HAMMER, F_ENGULF, F_DOJI, F_SSTAR),
}
GROUP_OF_COLUMN = np.zeros(N_FEATURES, dtype=np.int64)
for _g, _cols in _COLUMN_GROUP.items():
    GROUP_OF_COLUMN[list(_cols)] = _g
assert sorted(c for cols in _COLUMN_GROUP.values() for c in cols) == list(range(N_FEATURES))


def groups_for(columns: np.ndarray | list[int]) -> int:
    """The group mask that computes the given output columns."""
    mask = 0
    for col in columns:
        mask |= int(GROUP_OF_COLUMN[col])
    return mask


NAN = math.nan
# TA-Lib 0.8's TA_EPSILON (ta_utility.h): TA_IS_ZERO is |x| < 1e-14, TA_IS_ZERO_SCALED(v, s) is
# |v| <= 1e-14*s. Kept where the quantity is scale-free (DI sums) or already scaled (MFI's tie test).
_TA_EPSILON = 1e-14


# ---- helpers ---------------------------------------------------------------------------


@njit(cache=True, inline="always", error_model="numpy")
def _kadd(st, at, x):
    """Neumaier-compensated ``st[at] += x``; the exact sum is st[at] + st[at+1]."""
    s = st[at]
    tot = s + x
    if abs(s) >= abs(x):
        st[at + 1] += (s - tot) + x
    else:
        st[at + 1] += (x - tot) + s
    st[at] = tot


@njit(cache=True, inline="always", error_model="numpy")
def _window_mean(st, t, at, n, c, old):
    """Mean of the last n closes from a compensated running sum; ``old`` is the close leaving it."""
    _kadd(st, at, c)
    if t >= n:
        _kadd(st, at, -old)
    if t < n - 1:
        return NAN
    return (st[at] + st[at + 1]) / n


@njit(cache=True, inline="always", error_model="numpy")
def _ema(st, t, at, n, c, seed_sum):
    """TA-Lib EMA: seeded at candle n-1 with the plain mean of the first n closes (``seed_sum``)."""
    if t < n - 1:
        return NAN
    if t == n - 1:
        e = seed_sum / n
    else:
        e = ((c - st[at]) * (2.0 / (n + 1))) + st[at]
    st[at] = e
    return e


@njit(cache=True, inline="always", error_model="numpy")
def _rsi(st, t, at, n, d):
    """TA-Lib RSI: plain means of the first n gains/losses, then Wilder's smoothing."""
    if t == 0:
        return NAN
    g = st[at]
    ls = st[at + 1]
    if t > n:
        ls *= n - 1
        g *= n - 1
    if d < 0:
        ls -= d
    else:
        g += d
    if t < n:
        st[at] = g
        st[at + 1] = ls
        return NAN
    ls /= n
    g /= n
    st[at] = g
    st[at + 1] = ls
    s = g + ls
    return 100.0 * (g / s) if s != 0.0 else 0.0


@njit(cache=True, inline="always", error_model="numpy")
def _atr(st, t, at, n, tr):
    """TA-Lib ATR: plain mean of TR at candles 1..n, then (atr*(n-1)+tr)/n."""
    if t == 0:
        return NAN
    a = st[at]
    if t < n:
        st[at] = a + tr
        return NAN
    if t == n:
        a = (a + tr) / n
    else:
        a *= n - 1
        a += tr
        a /= n
    st[at] = a
    return a


@njit(cache=True, inline="always", error_model="numpy")
def _ring_sum3(st, at, newest):
    """Sum of a 3-slot ring oldest to newest (TA-Lib's SMA(3) order for its first value)."""
    return (st[at + (newest + 1) % 3] + st[at + (newest + 2) % 3]) + st[at + newest]


# The 20-wide window scans run on four independent accumulators (slots i, i+4, ...): a single
# running sum is a 20-add dependency chain per candle. Same order in batch and streaming.
@njit(cache=True, inline="always", error_model="numpy")
def _sum20(st, at):
    s0 = st[at]
    s1 = st[at + 1]
    s2 = st[at + 2]
    s3 = st[at + 3]
    for i in range(4, 20, 4):
        s0 += st[at + i]
        s1 += st[at + i + 1]
        s2 += st[at + i + 2]
        s3 += st[at + i + 3]
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, inline="always", error_model="numpy")
def _sq_dev20(st, at, mean):
    """Sum of squared deviations from ``mean`` over 20 slots (the second pass of a two-pass sigma)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for i in range(0, 20, 4):
        d0 = st[at + i] - mean
        d1 = st[at + i + 1] - mean
        d2 = st[at + i + 2] - mean
        d3 = st[at + i + 3] - mean
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, inline="always", error_model="numpy")
def _true_range(t, h, l, pc):  # noqa: E741
    """TA-Lib TRUE_RANGE, in its comparison order; h-l on the first candle."""
    tr = h - l
    if t >= 1:
        t2 = abs(h - pc)
        if t2 > tr:
            tr = t2
        t2 = abs(l - pc)
        if t2 > tr:
            tr = t2
    return tr


# ---- group steps -----------------------------------------------------------------------


@njit(cache=True, inline="always", error_model="numpy")
def _averages(st, t, c, row):
    if t < 200:
        st[SEED_SUM] += c
    seed = st[SEED_SUM]
    ring_old = st[RING_C + ((t - 200) & 255)]  # read before this close may overwrite it
    st[RING_C + (t & 255)] = c
    row[F_SMA10] = _window_mean(st, t, SMA10, 10, c, st[RING_C + ((t - 10) & 255)])
    row[F_SMA20] = _window_mean(st, t, SMA20, 20, c, st[RING_C + ((t - 20) & 255)])
    row[F_SMA50] = _window_mean(st, t, SMA50, 50, c, st[RING_C + ((t - 50) & 255)])
    row[F_SMA100] = _window_mean(st, t, SMA100, 100, c, st[RING_C + ((t - 100) & 255)])
    row[F_SMA200] = _window_mean(st, t, SMA200, 200, c, ring_old)
    row[F_EMA10] = _ema(st, t, EMA10, 10, c, seed)
    row[F_EMA20] = _ema(st, t, EMA20, 20, c, seed)
    row[F_EMA50] = _ema(st, t, EMA50, 50, c, seed)
    row[F_EMA100] = _ema(st, t, EMA100, 100, c, seed)
    row[F_EMA200] = _ema(st, t, EMA200, 200, c, seed)

    # MACD(12, 26, 9), TA-Lib seeding: both EMAs start at candle 25; EMA12 seeded on closes 14..25.
    row[F_MACD] = NAN
    row[F_MACDS] = NAN
    row[F_MACDH] = NAN
    if 14 <= t <= 25:
        st[MACD_SEED] += c
    if t >= 25:
        if t == 25:
            fast = st[MACD_SEED] / 12
            slow = seed / 26
        else:
            fast = ((c - st[MACD_FAST]) * (2.0 / 13.0)) + st[MACD_FAST]
            slow = ((c - st[MACD_SLOW]) * (2.0 / 27.0)) + st[MACD_SLOW]
        st[MACD_FAST] = fast
        st[MACD_SLOW] = slow
        m = fast - slow
        if t < 33:
            st[MACD_SIGSUM] += m
        else:
            if t == 33:
                sig = (st[MACD_SIGSUM] + m) / 9.0
            else:
                sig = ((m - st[MACD_SIG]) * (2.0 / 10.0)) + st[MACD_SIG]
            st[MACD_SIG] = sig
            row[F_MACD] = m
            row[F_MACDS] = sig
            row[F_MACDH] = m - sig

    row[F_ROC] = 100.0 * (c / st[RING_C + ((t - 12) & 255)] - 1.0) if t >= 12 else NAN
    row[F_MOM] = c - st[RING_C + ((t - 10) & 255)] if t >= 10 else NAN


@njit(cache=True, inline="always", error_model="numpy")
def _oscillators(st, t, h, l, c, pc, row):  # noqa: E741
    d = c - pc
    row[F_RSI14] = _rsi(st, t, RSI14, 14, d)
    row[F_RSI21] = _rsi(st, t, RSI21, 21, d)

    # Stochastic(14, 3 SMA, 3 SMA)
    st[RH14 + t % 14] = h
    st[RL14 + t % 14] = l
    row[F_STK] = NAN
    row[F_STD] = NAN
    if t >= 13:
        hh = st[RH14]
        ll = st[RL14]
        for i in range(1, 14):
            if st[RH14 + i] > hh:
                hh = st[RH14 + i]
            if st[RL14 + i] < ll:
                ll = st[RL14 + i]
        diff = (hh - ll) / 100.0
        fk = (c - ll) / diff if diff != 0.0 else 0.0
        s3 = (t - 13) % 3
        st[RFK + s3] = fk
        if t >= 15:
            sk = _ring_sum3(st, RFK, s3) / 3.0
            st[RSK + s3] = sk
            if t >= 17:
                row[F_STK] = sk
                row[F_STD] = _ring_sum3(st, RSK, s3) / 3.0


@njit(cache=True, inline="always", error_model="numpy")
def _bands(st, t, c, pc, row):
    # Bollinger(20, 2): two-pass population sigma over the window around the compensated SMA
    # (the very arithmetic of sma_20, so bb_middle == sma_20 bit for bit).
    slot = t % 20
    old = st[RC20 + slot]
    st[RC20 + slot] = c
    sma20 = _window_mean(st, t, BB_SUM, 20, c, old)
    if t >= 19:
        dev = 2.0 * math.sqrt(_sq_dev20(st, RC20, sma20) / 20.0)
        up = sma20 + dev
        lo = sma20 - dev
        row[F_BBU] = up
        row[F_BBM] = sma20
        row[F_BBL] = lo
        row[F_BBW] = ((up - lo) / sma20) * 100.0
        row[F_BBP] = (c - lo) / (up - lo) if up != lo else 0.5
    else:
        row[F_BBU] = NAN
        row[F_BBM] = NAN
        row[F_BBL] = NAN
        row[F_BBW] = NAN
        row[F_BBP] = NAN

    # historical volatility(20): sample std of log returns, two-pass
    row[F_HV] = NAN
    if t >= 1:
        st[RLR + (t - 1) % 20] = math.log(c / pc)
        if t >= 20:
            mean = _sum20(st, RLR) / 20.0
            row[F_HV] = math.sqrt(_sq_dev20(st, RLR, mean) / 19.0)


@njit(cache=True, inline="always", error_model="numpy")
def _ranges(st, t, h, l, c, ph, pl, pc, row):  # noqa: E741
    tr = _true_range(t, h, l, pc)
    atr14 = _atr(st, t, ATR14, 14, tr)
    row[F_ATR] = atr14
    row[F_NATR] = (atr14 / c) * 100.0

    # Keltner(20, 10, 2): EMA20 (its own copy of ema_20's arithmetic) +- 2*ATR10
    atr10 = _atr(st, t, ATR10, 10, tr)
    if t < 20:
        st[KC_SEED] += c
    ema20 = _ema(st, t, KC_EMA, 20, c, st[KC_SEED])
    if t >= 19:
        row[F_KCM] = ema20
        row[F_KCU] = ema20 + 2.0 * atr10
        row[F_KCL] = ema20 - 2.0 * atr10
    else:
        row[F_KCM] = NAN
        row[F_KCU] = NAN
        row[F_KCL] = NAN

    # ADX / +DI / -DI (14), TA-Lib seeding: DM and TR summed over candles 1..13.
    row[F_PDI] = NAN
    row[F_MDI] = NAN
    row[F_ADX] = NAN
    if t >= 1:
        dp = h - ph
        dm = pl - l
        pdm = st[ADX_PDM]
        mdm = st[ADX_MDM]
        trs = st[ADX_TR]
        if t >= 14:
            mdm -= mdm / 14.0
            pdm -= pdm / 14.0
        if dm > 0 and dp < dm:
            mdm += dm
        elif dp > 0 and dp > dm:
            pdm += dp
        if t >= 14:
            trs = trs - (trs / 14.0) + tr
        else:
            trs += tr
        st[ADX_PDM] = pdm
        st[ADX_MDM] = mdm
        st[ADX_TR] = trs
        if t >= 14:
            pdi = 0.0
            mdi = 0.0
            dx = NAN
            if trs != 0.0:
                mdi = 100.0 * (mdm / trs)
                pdi = 100.0 * (pdm / trs)
                dsum = mdi + pdi
                if not (-_TA_EPSILON < dsum < _TA_EPSILON):
                    dx = 100.0 * (abs(mdi - pdi) / dsum)
            row[F_PDI] = pdi
            row[F_MDI] = mdi
            if t <= 27:
                if dx == dx:
                    st[ADX_SUMDX] += dx
                if t == 27:
                    st[ADX_ADX] = st[ADX_SUMDX] / 14.0
                    row[F_ADX] = st[ADX_ADX]
            else:
                if dx == dx:
                    st[ADX_ADX] = ((st[ADX_ADX] * 13.0) + dx) / 14.0
                row[F_ADX] = st[ADX_ADX]


@njit(cache=True, inline="always", error_model="numpy")
def _flows(st, t, o, h, l, c, v, ph, pl, pc, pv, row):  # noqa: E741
    row[F_OPEN] = o
    row[F_HIGH] = h
    row[F_LOW] = l
    row[F_CLOSE] = c
    row[F_VOLUME] = v
    row[F_HL2] = (h + l) / 2.0

    # OBV (TA-Lib: starts at the first volume), VPT (`ta`: cumsum of pct_change*volume)
    if t == 0:
        obv = v
    else:
        obv = st[OBV]
        if c > pc:
            obv += v
        elif c < pc:
            obv -= v
    st[OBV] = obv
    row[F_OBV] = obv
    if t >= 1:
        vpt = st[VPT] + (c / pc - 1.0) * v
        st[VPT] = vpt
        row[F_VPT] = vpt
        row[F_PCH] = c / pc - 1.0
        row[F_VCH] = v / pv - 1.0 if pv != 0.0 else 0.0
    else:
        row[F_VPT] = NAN
        row[F_PCH] = NAN
        row[F_VCH] = NAN

    # CMF(20) (`ta` definition)
    rng = h - l
    mfv = (((c - l) - (h - c)) / rng if rng != 0.0 else 0.0) * v
    slot = t % 20
    old_mfv = st[RMFV + slot]
    old_vol = st[RVOL + slot]
    st[RMFV + slot] = mfv
    st[RVOL + slot] = v
    _kadd(st, CMF_MFV, mfv)
    _kadd(st, CMF_VOL, v)
    if t >= 20:
        _kadd(st, CMF_MFV, -old_mfv)
        _kadd(st, CMF_VOL, -old_vol)
    if t >= 19:
        vs = st[CMF_VOL] + st[CMF_VOL + 1]
        row[F_CMF] = (st[CMF_MFV] + st[CMF_MFV + 1]) / vs if vs != 0.0 else 0.0
    else:
        row[F_CMF] = NAN

    # MFI(14), TA-Lib 0.8: flows of candles 1..14 for the first value; a typical-price move within
    # TA_IS_ZERO_SCALED's relative dead-zone carries no flow; 14 flowless candles zero the sums.
    row[F_MFI] = NAN
    if t >= 1:
        tp = ((h + l) + c) / 3.0
        ptp = ((ph + pl) + pc) / 3.0
        dtp = tp - ptp
        flow = 0.0 if abs(dtp) <= _TA_EPSILON * (abs(tp) + abs(ptp)) else tp * v
        slot = (t - 1) % 14
        old_pos = st[RPOS + slot]
        old_neg = st[RNEG + slot]
        pos = 0.0 if dtp < 0.0 else flow
        neg = flow if dtp < 0.0 else 0.0
        st[RPOS + slot] = pos
        st[RNEG + slot] = neg
        if t >= 15:
            _kadd(st, MFI_POS, -old_pos)
            _kadd(st, MFI_NEG, -old_neg)
        _kadd(st, MFI_POS, pos)
        _kadd(st, MFI_NEG, neg)
        null_run = st[MFI_NULL] + 1.0 if flow == 0.0 else 0.0
        if null_run >= 14.0:
            null_run = 14.0
            for at in (MFI_POS, MFI_POS + 1, MFI_NEG, MFI_NEG + 1):
                st[at] = 0.0
        st[MFI_NULL] = null_run
        if t >= 14:
            ps = st[MFI_POS] + st[MFI_POS + 1]
            tot = ps + (st[MFI_NEG] + st[MFI_NEG + 1])
            ps = 0.0 if ps < 0.0 else (tot if ps > tot else ps)
            row[F_MFI] = 100.0 * (ps / tot) if tot > 0.0 else 0.0


@njit(cache=True, inline="always", error_model="numpy")
def _patterns(st, t, o, h, l, c, po, pl, pc, row):  # noqa: E741
    # TA-Lib defaults: BodyShort/ShadowVeryShort/BodyDoji averaged over 10 candles, Near over 5
    rng = h - l
    body = abs(c - o)
    st[RBODY + (t & 15)] = body
    st[RHL + (t & 15)] = rng
    upper = h - (c if c >= o else o)
    lower = (o if c >= o else c) - l

    if t < 10:
        st[DOJI_HL] += rng
        row[F_DOJI] = NAN
    else:
        row[F_DOJI] = 100.0 if body <= 0.1 * (st[DOJI_HL] / 10.0) else 0.0
        st[DOJI_HL] += rng - st[RHL + ((t - 10) & 15)]

    row[F_HAMMER] = NAN
    row[F_SSTAR] = NAN
    if 1 <= t <= 10:
        st[HS_BODY] += body
        st[HS_HL] += rng
        if 5 <= t <= 9:
            st[HS_NEAR] += rng
    elif t >= 11:
        avg_body = st[HS_BODY] / 10.0
        very_short = 0.1 * (st[HS_HL] / 10.0)
        near = 0.2 * (st[HS_NEAR] / 5.0)
        hammer = body < avg_body and lower > body and upper < very_short and min(c, o) <= pl + near
        row[F_HAMMER] = 100.0 if hammer else 0.0
        gap_up = min(o, c) > max(po, pc)
        star = gap_up and body < avg_body and upper > body and lower < very_short
        row[F_SSTAR] = -100.0 if star else 0.0
        st[HS_BODY] += body - st[RBODY + ((t - 10) & 15)]
        st[HS_HL] += rng - st[RHL + ((t - 10) & 15)]
        st[HS_NEAR] += st[RHL + ((t - 1) & 15)] - st[RHL + ((t - 6) & 15)]

    if t >= 2:
        white = c >= o
        prev_white = pc >= po
        engulf = (
            white
            and not prev_white
            and ((c >= po and o < pc) or (c > po and o <= pc))
        ) or (
            not white
            and prev_white
            and ((o >= pc and c < po) or (o > pc and c <= po))
        )
        colour = 1.0 if white else -1.0
        if engulf:
            row[F_ENGULF] = colour * (100.0 if (o != pc and c != po) else 80.0)
        else:
            row[F_ENGULF] = 0.0
    else:
        row[F_ENGULF] = NAN


# ---- the step --------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def step(st, o, h, l, c, v, row, groups):  # noqa: E741  (l is the candle low, as in TA-Lib)
    """Consume candle (o, h, l, c, v) for one key's state row ``st``; the ``groups`` write their columns of ``row``."""
    t = int(st[T])
    po = st[PO]
    ph = st[PH]
    pl = st[PL]
    pc = st[PC]
    pv = st[PV]
    if groups & G_AVERAGES:
        _averages(st, t, c, row)
    if groups & G_OSCILLATORS:
        _oscillators(st, t, h, l, c, pc, row)
    if groups & G_BANDS:
        _bands(st, t, c, pc, row)
    if groups & G_RANGES:
        _ranges(st, t, h, l, c, ph, pl, pc, row)
    if groups & G_FLOWS:
        _flows(st, t, o, h, l, c, v, ph, pl, pc, pv, row)
    if groups & G_PATTERNS:
        _patterns(st, t, o, h, l, c, po, pl, pc, row)
    st[T] = t + 1
    st[PO] = o
    st[PH] = h
    st[PL] = l
    st[PC] = c
    st[PV] = v


# ---- drivers ---------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def run_series(st, k, o, h, l, c, v, out, record, groups):  # noqa: E741
    """Feed a history to state row k. record: out has one row per candle; else out[0] is scratch."""
    srow = st[k]
    for i in range(o.shape[0]):
        step(srow, o[i], h[i], l[i], c[i], v[i], out[i if record else 0], groups)


def new_state(n_rows: int) -> np.ndarray:
    return np.zeros((n_rows, STATE_SIZE), dtype=np.float64)


def new_output(n_rows: int) -> np.ndarray:
    return np.empty((n_rows, N_FEATURES), dtype=np.float64)


# ---- streaming driver ------------------------------------------------------------------

NO_TIME = np.iinfo(np.int64).min  # last_open_time of a key that has seen no candle
ST_OK, ST_WARMING, ST_DUPLICATE, ST_INVALID = 0, 1, 2, 3


@njit(cache=True, nogil=True, error_model="numpy")
def update_rows(st, last_ot, interval_ms, rows, ot, o, h, l, c, v, out, status, gap_ms, problem, lookback, reset_on_gap, groups, lane, lanes):  # noqa: E741
    """Apply candle i to state row rows[i] unless it is invalid or not newer than that key's last.

    Only rows whose state row is ``lane`` modulo ``lanes`` are handled, so ``lanes`` threads can
    share one call: every key belongs to one lane, which applies its rows in order.

    status[i]: ST_OK (out[i] holds values for a warmed-up key), ST_WARMING, ST_DUPLICATE
    (open_time <= last seen; state untouched) or ST_INVALID (problem[i] says why).
    gap_ms[i]: how much later than one interval after the previous candle this one opened (0: none).
    Rows are applied in order, so one call may carry several candles of the same key.
    """
    for i in range(rows.shape[0]):
        k = rows[i]
        if k % lanes != lane:
            continue
        gap_ms[i] = 0
        p = candle_problem(o[i], h[i], l[i], c[i], v[i])
        problem[i] = p
        if p != 0:
            status[i] = ST_INVALID
            continue
        last = last_ot[k]
        if last != NO_TIME:
            if ot[i] <= last:
                status[i] = ST_DUPLICATE
                continue
            g = ot[i] - last - interval_ms[k]
            if g > 0:
                gap_ms[i] = g
                if reset_on_gap:
                    st[k, :] = 0.0
        last_ot[k] = ot[i]
        t = st[k, T]
        step(st[k], o[i], h[i], l[i], c[i], v[i], out[i], groups)
        status[i] = ST_OK if t >= lookback else ST_WARMING
