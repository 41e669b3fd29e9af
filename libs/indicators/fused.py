"""Fused batch loops: one tight loop per indicator group over a whole history, bit-identical to ``kernels.step``.

``kernels.step`` is written for streaming (one candle, state read from and written back to a
float64 row, every warm-up branch tested per candle). Over a long history that costs a load and
a store of every scalar per candle (numba cannot keep them in registers: the state row may alias
the output) and a dozen warm-up tests. Here the first ``WARM`` candles of a history go through
``kernels.step`` itself; from candle ``WARM`` on, every warm-up branch is settled, and each group
runs one loop with its scalars (sums, compensations, EMAs, Wilder averages) in local variables,
loaded once from the state row and stored back once at the end. Rings (windows) stay in the state
row. The arithmetic is ``kernels``' own, expression for expression and in the same order, so every
value is the same double (tests/libs/indicators/test_fused.py checks bit equality on the shipped
candles, outputs and final state).

Output: ``out`` is indexed ``out[feature, candle]``; pass ``matrix.T`` for a (candles, features)
matrix or a (features, candles) array for contiguous columns. Groups touch disjoint state slices
and output rows, so two threads may run different groups on the same state row and output.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from libs.indicators import kernels as K
from libs.indicators import simd
from libs.indicators.validation import _first_problem
from libs.indicators.kernels import (
    ADX_ADX, ADX_MDM, ADX_PDM, ADX_TR, ATR10, ATR14, BB_SUM, CMF_MFV, CMF_VOL, DOJI_HL, EMA10, EMA20, EMA50,
    EMA100, EMA200, F_ADX, F_ATR, F_BBL, F_BBM, F_BBP, F_BBU, F_BBW, F_CLOSE, F_CMF, F_DOJI, F_EMA10,
    F_EMA20, F_EMA50, F_EMA100, F_EMA200, F_ENGULF, F_HAMMER, F_HIGH, F_HL2, F_HV, F_KCL, F_KCM, F_KCU,
    F_LOW, F_MACD, F_MACDH, F_MACDS, F_MDI, F_MFI, F_MOM, F_NATR, F_OBV, F_OPEN, F_PCH, F_PDI, F_ROC,
    F_RSI14, F_RSI21, F_SMA10, F_SMA20, F_SMA50, F_SMA100, F_SMA200, F_SSTAR, F_STD, F_STK, F_VCH, F_VOLUME,
    F_VPT, G_AVERAGES, G_BANDS, G_FLOWS, G_OSCILLATORS, G_PATTERNS, G_RANGES, HS_BODY, HS_HL, HS_NEAR,
    KC_EMA, MACD_FAST, MACD_SIG, MACD_SLOW, MFI_NEG, MFI_NULL, MFI_POS, N_FEATURES, NAN, OBV, PC, PH, PL,
    PO, PV, RBODY, RC20, RFK, RH14, RHL, RING_C, RL14, RLR, RMFV, RNEG, RPOS, RSI14, RSI21, RSK, RVOL,
    SMA10, SMA20, SMA50, SMA100, SMA200, T, VPT, _TA_EPSILON, _sq_dev20, _true_range,
)

ALL = np.ones(N_FEATURES, dtype=np.bool_)  # ``want``: every column
CHUNK = 2048  # candles per chunk: 2048 rows of 49 float64 are 784 KiB, within L2
WARM = 256  # from this candle on no group has a warm-up branch left (the longest is SMA200's, 200)


@njit(cache=True, inline="always", error_model="numpy")
def _kadd(s, comp, x):
    """``kernels._kadd`` on locals: returns the new (sum, compensation)."""
    tot = s + x
    if abs(s) >= abs(x):
        comp += (s - tot) + x
    else:
        comp += (x - tot) + s
    return tot, comp


@njit(cache=True, inline="always", error_model="numpy")
def _prev3(st, start, x, y, c, at_x, at_y):
    """The previous candle's x, y and close: from the arrays inside a run, from the state at its start."""
    if start > 0:
        return x[start - 1], y[start - 1], c[start - 1]
    return st[at_x], st[at_y], st[PC]


@njit(cache=True, nogil=True, error_model="numpy")
def prefix(st, o, h, l, c, v, out, groups, want):  # noqa: E741
    """``kernels.step`` over candles while the state has seen fewer than WARM; returns how many."""
    row = np.empty(N_FEATURES)
    n = o.shape[0]
    i = 0
    while i < n and st[T] < WARM:
        K.step(st, o[i], h[i], l[i], c[i], v[i], row, groups)
        for f in range(N_FEATURES):
            if want[f] and K.GROUP_OF_COLUMN[f] & groups:
                out[f, i] = row[f]
        i += 1
    return i


@njit(cache=True, nogil=True, error_model="numpy")
def averages(st, t, start, end, c, out):
    s10, k10 = st[SMA10], st[SMA10 + 1]
    s20, k20 = st[SMA20], st[SMA20 + 1]
    s50, k50 = st[SMA50], st[SMA50 + 1]
    s100, k100 = st[SMA100], st[SMA100 + 1]
    s200, k200 = st[SMA200], st[SMA200 + 1]
    e10, e20, e50, e100, e200 = st[EMA10], st[EMA20], st[EMA50], st[EMA100], st[EMA200]
    fast, slow, sig = st[MACD_FAST], st[MACD_SLOW], st[MACD_SIG]
    for i in range(start, end):
        x = c[i]
        old200 = st[RING_C + ((t - 200) & 255)]
        st[RING_C + (t & 255)] = x
        s10, k10 = _kadd(s10, k10, x)
        s10, k10 = _kadd(s10, k10, -st[RING_C + ((t - 10) & 255)])
        out[F_SMA10, i] = (s10 + k10) / 10
        s20, k20 = _kadd(s20, k20, x)
        s20, k20 = _kadd(s20, k20, -st[RING_C + ((t - 20) & 255)])
        out[F_SMA20, i] = (s20 + k20) / 20
        s50, k50 = _kadd(s50, k50, x)
        s50, k50 = _kadd(s50, k50, -st[RING_C + ((t - 50) & 255)])
        out[F_SMA50, i] = (s50 + k50) / 50
        s100, k100 = _kadd(s100, k100, x)
        s100, k100 = _kadd(s100, k100, -st[RING_C + ((t - 100) & 255)])
        out[F_SMA100, i] = (s100 + k100) / 100
        s200, k200 = _kadd(s200, k200, x)
        s200, k200 = _kadd(s200, k200, -old200)
        out[F_SMA200, i] = (s200 + k200) / 200
        e10 = ((x - e10) * (2.0 / (10 + 1))) + e10
        out[F_EMA10, i] = e10
        e20 = ((x - e20) * (2.0 / (20 + 1))) + e20
        out[F_EMA20, i] = e20
        e50 = ((x - e50) * (2.0 / (50 + 1))) + e50
        out[F_EMA50, i] = e50
        e100 = ((x - e100) * (2.0 / (100 + 1))) + e100
        out[F_EMA100, i] = e100
        e200 = ((x - e200) * (2.0 / (200 + 1))) + e200
        out[F_EMA200, i] = e200
        fast = ((x - fast) * (2.0 / 13.0)) + fast
        slow = ((x - slow) * (2.0 / 27.0)) + slow
        m = fast - slow
        sig = ((m - sig) * (2.0 / 10.0)) + sig
        out[F_MACD, i] = m
        out[F_MACDS, i] = sig
        out[F_MACDH, i] = m - sig
        out[F_ROC, i] = 100.0 * (x / st[RING_C + ((t - 12) & 255)] - 1.0)
        out[F_MOM, i] = x - st[RING_C + ((t - 10) & 255)]
        t += 1
    st[SMA10], st[SMA10 + 1] = s10, k10
    st[SMA20], st[SMA20 + 1] = s20, k20
    st[SMA50], st[SMA50 + 1] = s50, k50
    st[SMA100], st[SMA100 + 1] = s100, k100
    st[SMA200], st[SMA200 + 1] = s200, k200
    st[EMA10], st[EMA20], st[EMA50], st[EMA100], st[EMA200] = e10, e20, e50, e100, e200
    st[MACD_FAST], st[MACD_SLOW], st[MACD_SIG] = fast, slow, sig


@njit(cache=True, nogil=True, error_model="numpy")
def oscillators(st, t, start, end, h, l, c, out):  # noqa: E741
    pc = c[start - 1] if start > 0 else st[PC]
    g14, l14 = st[RSI14], st[RSI14 + 1]
    g21, l21 = st[RSI21], st[RSI21 + 1]
    # %K and slow %K of the last candles, in locals (kernels keeps them in 3-slot rings): *1 is the
    # previous candle's, *2 the one before, *3 the one before that (its slot is the next written)
    fk1, fk2, fk3 = st[RFK + (t - 14) % 3], st[RFK + (t - 15) % 3], st[RFK + (t - 16) % 3]
    sk1, sk2, sk3 = st[RSK + (t - 14) % 3], st[RSK + (t - 15) % 3], st[RSK + (t - 16) % 3]
    for i in range(start, end):
        x = c[i]
        d = x - pc
        # kernels._rsi (Wilder) for 14 and 21, the sign test as selects, the divisions packed:
        # (loss, gain) / n for both here, gain / (gain + loss) with the stochastic range below
        neg = d < 0
        l14, g14, l21, g21 = simd.vdiv(
            (l14 * (14 - 1) - d if neg else l14 * (14 - 1), g14 * (14 - 1) if neg else g14 * (14 - 1) + d,
             l21 * (21 - 1) - d if neg else l21 * (21 - 1), g21 * (21 - 1) if neg else g21 * (21 - 1) + d),
            (14.0, 14.0, 21.0, 21.0))
        s14 = g14 + l14
        s21 = g21 + l21
        if i < 13:  # the window reaches into an earlier call: its ring, as kernels does
            st[RH14 + t % 14] = h[i]
            st[RL14 + t % 14] = l[i]
            hh = st[RH14]
            ll = st[RL14]
            for j in range(1, 14):
                if st[RH14 + j] > hh:
                    hh = st[RH14 + j]
                if st[RL14 + j] < ll:
                    ll = st[RL14 + j]
        else:
            # h[i-13..i] itself, four 4-wide maxima (a max is one of the numbers: the same double)
            hh = simd.max14(h, i)
            ll = simd.min14(l, i)
        r14, r21, diff = simd.vdiv((g14, g21, hh - ll), (s14, s21, 100.0))
        out[F_RSI14, i] = 100.0 * r14 if s14 != 0.0 else 0.0
        out[F_RSI21, i] = 100.0 * r21 if s21 != 0.0 else 0.0
        fk = (x - ll) / diff if diff != 0.0 else 0.0
        sk = ((fk2 + fk1) + fk) / 3.0  # kernels._ring_sum3: oldest to newest
        out[F_STK, i] = sk
        out[F_STD, i] = ((sk2 + sk1) + sk) / 3.0
        fk3, fk2, fk1 = fk2, fk1, fk
        sk3, sk2, sk1 = sk2, sk1, sk
        pc = x
        t += 1
    # the rings as kernels leaves them: the last 14 highs/lows, the last 3 %K and slow %K
    for i in range(max(start, end - 14), end):
        st[RH14 + (t - (end - i)) % 14] = h[i]
        st[RL14 + (t - (end - i)) % 14] = l[i]
    st[RFK + (t - 14) % 3], st[RFK + (t - 15) % 3], st[RFK + (t - 16) % 3] = fk1, fk2, fk3
    st[RSK + (t - 14) % 3], st[RSK + (t - 15) % 3], st[RSK + (t - 16) % 3] = sk1, sk2, sk3
    st[RSI14], st[RSI14 + 1] = g14, l14
    st[RSI21], st[RSI21 + 1] = g21, l21


@njit(cache=True, nogil=True, error_model="numpy")
def bands(st, t, start, end, c, out, want):
    w_bbw, w_bbp, w_hv = want[F_BBW], want[F_BBP], want[F_HV]
    n = c.shape[0]
    pc = c[start - 1] if start > 0 else st[PC]
    s, k = st[BB_SUM], st[BB_SUM + 1]
    if w_hv:
        # hv_20's log returns in a line: 20 spare, the ring's 20 oldest to newest, this run's, 20
        # spare (the window reads of simd.*_window span 20 either side; the spare lanes are loaded,
        # never selected). The ring is still kept per candle (the state).
        lr = np.empty(end - start + 60)
        for j in range(20):
            lr[20 + j] = st[RLR + (t - 21 + j) % 20]
        # the logs first, in a loop of their own: a call to log inside the main loop spills and
        # reloads every live register (all of them are caller-saved)
        prev = pc
        for i in range(start, end):
            lr[40 + (i - start)] = math.log(c[i] / prev)
            prev = c[i]
    for i in range(start, end):
        x = c[i]
        slot = t % 20
        old = st[RC20 + slot]
        st[RC20 + slot] = x
        s, k = _kadd(s, k, x)
        s, k = _kadd(s, k, -old)
        sma20 = (s + k) / 20
        if i >= 40 and i + 20 <= n:
            sq = simd.sq_dev20_window(c, i, slot, sma20)
        else:
            sq = _sq_dev20(st, RC20, sma20)
        dev = 2.0 * math.sqrt(sq / 20.0)
        up = sma20 + dev
        lo = sma20 - dev
        out[F_BBU, i] = up
        out[F_BBM, i] = sma20
        out[F_BBL, i] = lo
        if w_bbw:
            out[F_BBW, i] = ((up - lo) / sma20) * 100.0
        if w_bbp:
            out[F_BBP, i] = (x - lo) / (up - lo) if up != lo else 0.5
        if w_hv:
            p = 40 + (i - start)
            st[RLR + (t - 1) % 20] = lr[p]
            mean = simd.sum20_window(lr, p, (t - 1) % 20) / 20.0
            out[F_HV, i] = math.sqrt(simd.sq_dev20_window(lr, p, (t - 1) % 20, mean) / 19.0)
        pc = x
        t += 1
    st[BB_SUM], st[BB_SUM + 1] = s, k


@njit(cache=True, nogil=True, error_model="numpy")
def ranges(st, t, start, end, h, l, c, out, want):  # noqa: E741
    w_kcu, w_kcl = want[F_KCU], want[F_KCL]
    ph, pl, pc = _prev3(st, start, h, l, c, PH, PL)
    a14, a10, kc = st[ATR14], st[ATR10], st[KC_EMA]
    pdm, mdm, trs, adx = st[ADX_PDM], st[ADX_MDM], st[ADX_TR], st[ADX_ADX]
    for i in range(start, end):
        hi = h[i]
        lw = l[i]
        x = c[i]
        tr = _true_range(t, hi, lw, pc)
        a14 *= 14 - 1
        a14 += tr
        a14 /= 14
        out[F_ATR, i] = a14
        out[F_NATR, i] = (a14 / x) * 100.0
        a10 *= 10 - 1
        a10 += tr
        a10 /= 10
        kc = ((x - kc) * (2.0 / (20 + 1))) + kc
        out[F_KCM, i] = kc
        if w_kcu:
            out[F_KCU, i] = kc + 2.0 * a10
        if w_kcl:
            out[F_KCL, i] = kc - 2.0 * a10
        dp = hi - ph
        dm = pl - lw
        mdm -= mdm / 14.0
        pdm -= pdm / 14.0
        if dm > 0 and dp < dm:
            mdm += dm
        elif dp > 0 and dp > dm:
            pdm += dp
        trs = trs - (trs / 14.0) + tr
        pdi = 0.0
        mdi = 0.0
        dx = NAN
        if trs != 0.0:
            mdi = 100.0 * (mdm / trs)
            pdi = 100.0 * (pdm / trs)
            dsum = mdi + pdi
            if not (-_TA_EPSILON < dsum < _TA_EPSILON):
                dx = 100.0 * (abs(mdi - pdi) / dsum)
        out[F_PDI, i] = pdi
        out[F_MDI, i] = mdi
        if dx == dx:
            adx = ((adx * 13.0) + dx) / 14.0
        out[F_ADX, i] = adx
        ph = hi
        pl = lw
        pc = x
        t += 1
    st[ATR14], st[ATR10], st[KC_EMA] = a14, a10, kc
    st[ADX_PDM], st[ADX_MDM], st[ADX_TR], st[ADX_ADX] = pdm, mdm, trs, adx


@njit(cache=True, nogil=True, error_model="numpy")
def flows(st, t, start, end, o, h, l, c, v, out, want):  # noqa: E741
    w_ohlcv = want[F_OPEN] or want[F_HIGH] or want[F_LOW] or want[F_CLOSE] or want[F_VOLUME]
    w_vpt, w_pch, w_vch, w_cmf = want[F_VPT], want[F_PCH], want[F_VCH], want[F_CMF]
    ph, pl, pc = _prev3(st, start, h, l, c, PH, PL)
    pv = v[start - 1] if start > 0 else st[PV]
    obv, vpt = st[OBV], st[VPT]
    mf, mfk = st[CMF_MFV], st[CMF_MFV + 1]
    vs_, vk = st[CMF_VOL], st[CMF_VOL + 1]
    ps_, pk = st[MFI_POS], st[MFI_POS + 1]
    ns_, nk = st[MFI_NEG], st[MFI_NEG + 1]
    null_run = st[MFI_NULL]
    ptp = ((ph + pl) + pc) / 3.0
    for i in range(start, end):
        hi = h[i]
        lw = l[i]
        x = c[i]
        vol = v[i]
        if w_ohlcv:
            out[F_OPEN, i] = o[i]
            out[F_HIGH, i] = hi
            out[F_LOW, i] = lw
            out[F_CLOSE, i] = x
            out[F_VOLUME, i] = vol
        out[F_HL2, i] = (hi + lw) / 2.0
        # if x > pc: obv += vol, elif x < pc: obv -= vol; as selects (up or down is a coin toss)
        obv = obv + vol if x > pc else (obv - vol if x < pc else obv)
        out[F_OBV, i] = obv
        if w_vpt:
            vpt = vpt + (x / pc - 1.0) * vol
            out[F_VPT, i] = vpt
        if w_pch:
            out[F_PCH, i] = x / pc - 1.0
        if w_vch:
            out[F_VCH, i] = vol / pv - 1.0 if pv != 0.0 else 0.0

        if w_cmf:
            rng = hi - lw
            mfv = (((x - lw) - (hi - x)) / rng if rng != 0.0 else 0.0) * vol
            slot = t % 20
            old_mfv = st[RMFV + slot]
            old_vol = st[RVOL + slot]
            st[RMFV + slot] = mfv
            st[RVOL + slot] = vol
            mf, mfk = _kadd(mf, mfk, mfv)
            vs_, vk = _kadd(vs_, vk, vol)
            mf, mfk = _kadd(mf, mfk, -old_mfv)
            vs_, vk = _kadd(vs_, vk, -old_vol)
            vsum = vs_ + vk
            out[F_CMF, i] = (mf + mfk) / vsum if vsum != 0.0 else 0.0

        tp = ((hi + lw) + x) / 3.0
        dtp = tp - ptp  # ptp: the previous candle's tp, the same expression over the same numbers
        flow = 0.0 if abs(dtp) <= _TA_EPSILON * (abs(tp) + abs(ptp)) else tp * vol
        slot = (t - 1) % 14
        old_pos = st[RPOS + slot]
        old_neg = st[RNEG + slot]
        pos = 0.0 if dtp < 0.0 else flow
        neg = flow if dtp < 0.0 else 0.0
        st[RPOS + slot] = pos
        st[RNEG + slot] = neg
        ps_, pk = _kadd(ps_, pk, -old_pos)
        ns_, nk = _kadd(ns_, nk, -old_neg)
        ps_, pk = _kadd(ps_, pk, pos)
        ns_, nk = _kadd(ns_, nk, neg)
        null_run = null_run + 1.0 if flow == 0.0 else 0.0
        if null_run >= 14.0:
            null_run = 14.0
            ps_ = 0.0
            pk = 0.0
            ns_ = 0.0
            nk = 0.0
        p = ps_ + pk
        tot = p + (ns_ + nk)
        p = 0.0 if p < 0.0 else (tot if p > tot else p)
        out[F_MFI, i] = 100.0 * (p / tot) if tot > 0.0 else 0.0
        ptp = tp
        pc = x
        pv = vol
        t += 1
    st[OBV], st[VPT] = obv, vpt
    st[CMF_MFV], st[CMF_MFV + 1] = mf, mfk
    st[CMF_VOL], st[CMF_VOL + 1] = vs_, vk
    st[MFI_POS], st[MFI_POS + 1] = ps_, pk
    st[MFI_NEG], st[MFI_NEG + 1] = ns_, nk
    st[MFI_NULL] = null_run


@njit(cache=True, nogil=True, error_model="numpy")
def patterns(st, t, start, end, o, h, l, c, out):  # noqa: E741
    po, pl, pc = _prev3(st, start, o, l, c, PO, PL)
    doji_hl, hs_body, hs_hl, hs_near = st[DOJI_HL], st[HS_BODY], st[HS_HL], st[HS_NEAR]
    for i in range(start, end):
        op = o[i]
        hi = h[i]
        lw = l[i]
        x = c[i]
        rng = hi - lw
        body = abs(x - op)
        st[RBODY + (t & 15)] = body
        st[RHL + (t & 15)] = rng
        upper = hi - (x if x >= op else op)
        lower = (op if x >= op else x) - lw

        out[F_DOJI, i] = 100.0 if body <= 0.1 * (doji_hl / 10.0) else 0.0
        doji_hl += rng - st[RHL + ((t - 10) & 15)]

        avg_body = hs_body / 10.0
        very_short = 0.1 * (hs_hl / 10.0)
        near = 0.2 * (hs_near / 5.0)
        hammer = body < avg_body and lower > body and upper < very_short and min(x, op) <= pl + near
        out[F_HAMMER, i] = 100.0 if hammer else 0.0
        gap_up = min(op, x) > max(po, pc)
        star = gap_up and body < avg_body and upper > body and lower < very_short
        out[F_SSTAR, i] = -100.0 if star else 0.0
        hs_body += body - st[RBODY + ((t - 10) & 15)]
        hs_hl += rng - st[RHL + ((t - 10) & 15)]
        hs_near += st[RHL + ((t - 1) & 15)] - st[RHL + ((t - 6) & 15)]

        white = x >= op
        prev_white = pc >= po
        engulf = (
            white
            and not prev_white
            and ((x >= po and op < pc) or (x > po and op <= pc))
        ) or (
            not white
            and prev_white
            and ((op >= pc and x < po) or (op > pc and x <= po))
        )
        colour = 1.0 if white else -1.0
        if engulf:
            out[F_ENGULF, i] = colour * (100.0 if (op != pc and x != po) else 80.0)
        else:
            out[F_ENGULF, i] = 0.0
        po = op
        pl = lw
        pc = x
        t += 1
    st[DOJI_HL], st[HS_BODY], st[HS_HL], st[HS_NEAR] = doji_hl, hs_body, hs_hl, hs_near


@njit(cache=True, nogil=True, error_model="numpy")
def run_groups(st, start, o, h, l, c, v, out, groups, want, check=False):  # noqa: E741
    """The steady-state loops of ``groups`` over candles start.. (the state is past WARM).

    Chunks of CHUNK candles, every group over a chunk before the next, so a (candles, features)
    output's rows are still in cache when the next group writes its columns of them.
    ``want[feature]``: False skips writing that column, and for hv_20, vpt and cmf_20 computing
    it: their state then goes stale, so pass ``ALL`` unless the state row is thrown away after.
    Leaves ``T`` and the previous candle alone: ``finish`` sets them once every group is done.
    ``check``: each chunk's candles are validated (``validation.candle_problem``) just before the
    groups read them (then from cache: a separate pass over 1e6 candles cost ~5.7 ms, the
    input streamed from memory twice); the first impossible candle stops the run, and its index
    is returned (else -1), its chunk and those after it not computed.
    """
    n = c.shape[0]
    t0 = int(st[T])
    for i0 in range(start, n, CHUNK):
        i1 = min(i0 + CHUNK, n)
        if check:
            bad, _ = _first_problem(o[i0:i1], h[i0:i1], l[i0:i1], c[i0:i1], v[i0:i1])
            if bad >= 0:
                return i0 + bad
        t = t0 + (i0 - start)
        if groups & G_AVERAGES:
            averages(st, t, i0, i1, c, out)
        if groups & G_OSCILLATORS:
            oscillators(st, t, i0, i1, h, l, c, out)
        if groups & G_BANDS:
            bands(st, t, i0, i1, c, out, want)
        if groups & G_RANGES:
            ranges(st, t, i0, i1, h, l, c, out, want)
        if groups & G_FLOWS:
            flows(st, t, i0, i1, o, h, l, c, v, out, want)
        if groups & G_PATTERNS:
            patterns(st, t, i0, i1, o, h, l, c, out)
    return -1


def finish(st: np.ndarray, start: int, o, h, l, c, v) -> None:  # noqa: E741
    """After ``run_groups``: the candle counter and the previous candle, as ``kernels.step`` leaves them."""
    n = c.shape[0]
    if start < n:
        st[T] += n - start
        st[PO], st[PH], st[PL], st[PC], st[PV] = o[-1], h[-1], l[-1], c[-1], v[-1]


def run_series(st: np.ndarray, o, h, l, c, v, out: np.ndarray, groups: int) -> None:  # noqa: E741
    """``kernels.run_series(st[None], 0, ..., out.T, True, groups)`` with the fused loops, one thread.

    ``st``: one state row (1-D); ``out``: indexed [feature, candle].
    """
    start = prefix(st, o, h, l, c, v, out, groups, ALL)
    run_groups(st, start, o, h, l, c, v, out, groups, ALL)
    finish(st, start, o, h, l, c, v)
