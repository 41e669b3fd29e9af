"""Packed (SIMD) forms of the scalar arithmetic the fused loops need, lane for lane the same doubles.

Numba leaves LLVM's SLP vectoriser off, so independent scalar divisions stay one ``vdivsd``
each and the 20-wide window passes (four accumulators by design) stay scalar. A division is
correctly rounded whether one or four are done at once, and an add or a multiply likewise, so
emitting the packed instruction changes no value: each lane runs exactly the scalar expression
(no fused multiply-add: plain ``fmul``/``fadd`` without fast-math flags are never contracted).

* ``sq_dev20_window(c, i, s, mean)`` = ``kernels._sq_dev20`` of Bollinger's 20-slot ring, its
  four accumulators one 4-lane vector, the slots read from the close array itself (a 4-wide load
  from the ring right after the scalar store of its newest slot stalls on store forwarding:
  that version measured 1.25x slower than scalar, this one 0.52x).
* ``sum20_window(c, i, s)`` = ``kernels._sum20`` of such a ring, the same way (hv_20's mean).
* ``vdiv((a0, a1, ...), (b0, b1, ...))`` -> ``(a0 / b0, a1 / b1, ...)``, 2 to 8 lanes, one
  packed division.
* ``max14(a, i)`` / ``min14(a, i)``: the extreme of a[i-13 .. i] as four overlapping 4-wide
  vectors (an extreme is one of the numbers: the same double for positive, non-NaN input).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

_F64 = ir.DoubleType()
_V4 = ir.VectorType(_F64, 4)
_I32 = ir.IntType(32)


def _pack(builder, values, vt):
    vec = ir.Constant(vt, ir.Undefined)
    for i, x in enumerate(values):
        vec = builder.insert_element(vec, x, ir.Constant(_I32, i))
    return vec


@intrinsic
def vdiv(typingctx, a, b):
    """Element-wise ``a[i] / b[i]`` of two equally long tuples of float64, as one packed division."""
    if not (isinstance(a, types.UniTuple) and isinstance(b, types.UniTuple) and a.count == b.count
            and a.dtype == types.float64 and b.dtype == types.float64 and 2 <= a.count <= 8):
        return None
    n = a.count
    sig = types.UniTuple(types.float64, n)(a, b)

    def codegen(context, builder, signature, args):
        vt = ir.VectorType(_F64, n)
        xs = [builder.extract_value(args[0], i) for i in range(n)]
        ys = [builder.extract_value(args[1], i) for i in range(n)]
        q = builder.fdiv(_pack(builder, xs, vt), _pack(builder, ys, vt))
        out = [builder.extract_element(q, ir.Constant(_I32, i)) for i in range(n)]
        return context.make_tuple(builder, signature.return_type, out)

    return sig, codegen


def _load4(builder, base, k):
    p = builder.gep(base, [ir.Constant(ir.IntType(64), k)])
    return builder.load(builder.bitcast(p, _V4.as_pointer()), align=8)


def _hsum(builder, acc):
    """(s0 + s1) + (s2 + s3) of a 4-lane vector, as ``kernels`` adds its accumulators."""
    s = [builder.extract_element(acc, ir.Constant(_I32, i)) for i in range(4)]
    return builder.fadd(builder.fadd(s[0], s[1]), builder.fadd(s[2], s[3]))


def _ring_start(context, builder, signature, ary, ii, ss):
    """For the ring passes: a pointer to c[i - s] (the ring's slot 0 as c[b + 0]) and ``s`` in
    four lanes (a slot j <= s is read from c[b + j], a later one from c[b + j - 20])."""
    i64 = ir.IntType(64)
    ii = builder.sext(ii, i64) if ii.type.width < 64 else ii
    ss = builder.sext(ss, i64) if ss.type.width < 64 else ss
    data = context.make_array(signature.args[0])(context, builder, ary).data
    return builder.gep(data, [builder.sub(ii, ss)]), _pack(builder, [ss] * 4, ir.VectorType(i64, 4))


@intrinsic
def sq_dev20_window(typingctx, c, i, s, mean):
    """``kernels._sq_dev20`` of the 20-slot ring whose slot ``s`` holds ``c[i]``, read from ``c`` itself.

    The ring's slot j holds c[i - ((s - j) mod 20)]: c[b + j] for j <= s and c[b + j - 20] for
    j > s (b = i - s). Both 4-slot spans are loaded from ``c`` and merged by a lane mask, so no
    load waits on the ring's freshly stored slot (a wide load over a narrow store in flight stalls).
    Reads c[i-s-20 .. i-s+19]: the caller guarantees 20+s <= i and i-s+19 < len(c).
    """
    if not (isinstance(c, types.Array) and c.ndim == 1 and c.dtype == types.float64 and c.layout == "C"
            and isinstance(i, types.Integer) and isinstance(s, types.Integer) and mean == types.float64):
        return None
    sig = types.float64(c, i, s, mean)

    def codegen(context, builder, signature, args):
        ary, ii, ss, m = args
        base, vs = _ring_start(context, builder, signature, ary, ii, ss)
        i64 = ir.IntType(64)
        mv = _pack(builder, [m] * 4, _V4)
        acc = ir.Constant(_V4, [0.0] * 4)
        for k in range(0, 20, 4):
            recent = _load4(builder, base, k)  # slots k..k+3 as c[b + j]
            older = _load4(builder, base, k - 20)  # ... as c[b + j - 20]
            slots = ir.Constant(ir.VectorType(i64, 4), [k, k + 1, k + 2, k + 3])
            x = builder.select(builder.icmp_signed("<=", slots, vs), recent, older)
            d = builder.fsub(x, mv)
            acc = builder.fadd(acc, builder.fmul(d, d))
        return _hsum(builder, acc)

    return sig, codegen


@intrinsic
def sum20_window(typingctx, c, i, s):
    """``kernels._sum20`` of the 20-slot ring whose slot ``s`` holds ``c[i]``, read from ``c`` as
    ``sq_dev20_window`` does (same bounds)."""
    if not (isinstance(c, types.Array) and c.ndim == 1 and c.dtype == types.float64 and c.layout == "C"
            and isinstance(i, types.Integer) and isinstance(s, types.Integer)):
        return None
    sig = types.float64(c, i, s)

    def codegen(context, builder, signature, args):
        ary, ii, ss = args
        base, vs = _ring_start(context, builder, signature, ary, ii, ss)
        i64 = ir.IntType(64)
        acc = None
        for k in range(0, 20, 4):
            slots = ir.Constant(ir.VectorType(i64, 4), [k, k + 1, k + 2, k + 3])
            x = builder.select(builder.icmp_signed("<=", slots, vs), _load4(builder, base, k),
                               _load4(builder, base, k - 20))
            acc = x if acc is None else builder.fadd(acc, x)  # s_j = slot j, then += slot j+4, ...
        return _hsum(builder, acc)

    return sig, codegen


def _window_extreme(fn_name):
    @intrinsic
    def extreme14(typingctx, a, i):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float64 and a.layout == "C"
                and isinstance(i, types.Integer)):
            return None
        sig = types.float64(a, i)

        def codegen(context, builder, signature, args):
            ary, ii = args
            i64 = ir.IntType(64)
            ii = builder.sext(ii, i64) if ii.type.width < 64 else ii
            data = context.make_array(signature.args[0])(context, builder, ary).data
            base = builder.gep(data, [ii])
            # a[i-13..i] as four overlapping 4-spans (i-13, i-9, i-5, i-3): an extreme ignores repeats
            v = [_load4(builder, base, k) for k in (-13, -9, -5, -3)]
            pick = "ogt" if fn_name == "max" else "olt"

            def ext(x, y):
                return builder.select(builder.fcmp_ordered(">" if pick == "ogt" else "<", x, y), x, y)

            m = ext(ext(v[0], v[1]), ext(v[2], v[3]))
            s = [builder.extract_element(m, ir.Constant(_I32, k)) for k in range(4)]
            return ext(ext(s[0], s[1]), ext(s[2], s[3]))

        return sig, codegen

    return extreme14


max14 = _window_extreme("max")
max14.__doc__ = "max(a[i-13 .. i]) for i >= 13 (no NaN in a): the same double whatever the order."
min14 = _window_extreme("min")
min14.__doc__ = "min(a[i-13 .. i]) for i >= 13 (no NaN in a)."
