//go:build amd64 && !purego

#include "textflag.h"

// Constants, each repeated in four float64 (or int64) lanes for 256-bit memory operands.
#define CONST4(name, bits) \
	DATA name<>+0(SB)/8, $bits; \
	DATA name<>+8(SB)/8, $bits; \
	DATA name<>+16(SB)/8, $bits; \
	DATA name<>+24(SB)/8, $bits; \
	GLOBL name<>(SB), RODATA|NOPTR, $32

CONST4(expLo, 0xc05a000000000000)     // -104
CONST4(expHi, 0x4056400000000000)     // 89
CONST4(expLog2e, 0x3ff71547652b82fe)  // 1.4426950408889634
CONST4(expShifter, 0x4338000000000000) // 0x1.8p52
CONST4(expLn2, 0x3fe62e42fefa39ef)    // 0.6931471805599453
CONST4(expC0, 0x3f2a0d2ce64969e6)     // 1.9875691500e-4
CONST4(expC1, 0x3f56e879c3f007dd)     // 1.3981999507e-3
CONST4(expC2, 0x3f811120fb3cb51d)     // 8.3334519073e-3
CONST4(expC3, 0x3fa555381d73fd31)     // 4.1665795894e-2
CONST4(expC4, 0x3fc555553b661d99)     // 1.6666665459e-1
CONST4(expC5, 0x3fe000000672a44f)     // 5.0000001201e-1
CONST4(expOne, 0x3ff0000000000000)    // 1
CONST4(expBias, 0x00000000000003ff)   // 1023 (int64)
CONST4(expAbs, 0x7fffffffffffffff)    // clears the sign bit
CONST4(expSign, 0x8000000000000000)   // the sign bit
CONST4(exp104, 0x405a000000000000)    // 104

// EXP4 sets Y5 = e^Y1 (four float64 in [-104, 89]) exactly as expReduced computes it.
// It uses Y2-Y6.
#define EXP4 \
	VMULPD expLog2e<>(SB), Y1, Y2; \
	VADDPD expShifter<>(SB), Y2, Y2; \
	VSUBPD expShifter<>(SB), Y2, Y3; \
	VMULPD expLn2<>(SB), Y3, Y4; \
	VSUBPD Y4, Y1, Y4; \
	VMULPD expC0<>(SB), Y4, Y5; \
	VADDPD expC1<>(SB), Y5, Y5; \
	VMULPD Y4, Y5, Y5; \
	VADDPD expC2<>(SB), Y5, Y5; \
	VMULPD Y4, Y5, Y5; \
	VADDPD expC3<>(SB), Y5, Y5; \
	VMULPD Y4, Y5, Y5; \
	VADDPD expC4<>(SB), Y5, Y5; \
	VMULPD Y4, Y5, Y5; \
	VADDPD expC5<>(SB), Y5, Y5; \
	VMULPD Y4, Y5, Y5; \
	VMULPD Y4, Y5, Y5; \
	VADDPD Y4, Y5, Y5; \
	VADDPD expOne<>(SB), Y5, Y5; \
	VPSUBQ expShifter<>(SB), Y2, Y6; \
	VPADDQ expBias<>(SB), Y6, Y6; \
	VPSLLQ $52, Y6, Y6; \
	VMULPD Y6, Y5, Y5

// func exp32AVX2(in, out *float32, blocks int)
// out[i] = exp32(in[i]) for 4·blocks values.
TEXT ·exp32AVX2(SB), NOSPLIT, $0-24
	MOVQ in+0(FP), SI
	MOVQ out+8(FP), DI
	MOVQ blocks+16(FP), CX
	TESTQ CX, CX
	JZ   expDone

expLoop:
	VMOVUPS (SI), X0
	VCVTPS2PD X0, Y1
	VMAXPD expLo<>(SB), Y1, Y1
	VMINPD expHi<>(SB), Y1, Y1
	EXP4
	VCVTPD2PSY Y5, X5
	VCMPPS $3, X0, X0, X7     // unordered: x is NaN
	VBLENDVPS X7, X0, X5, X5  // NaN stays NaN
	VMOVUPS X5, (DI)
	ADDQ $16, SI
	ADDQ $16, DI
	DECQ CX
	JNZ  expLoop

expDone:
	VZEROUPPER
	RET

// func logistic32AVX2(in, out *float32, blocks int)
// out[i] = logistic32(in[i]) for 4·blocks values: from e = e^-min(|x|, 104), 1/(1+e) where
// x ≥ 0 and e/(1+e) elsewhere.
TEXT ·logistic32AVX2(SB), NOSPLIT, $0-24
	MOVQ in+0(FP), SI
	MOVQ out+8(FP), DI
	MOVQ blocks+16(FP), CX
	TESTQ CX, CX
	JZ   logDone
	VXORPD Y9, Y9, Y9         // zeros

logLoop:
	VMOVUPS (SI), X0
	VCVTPS2PD X0, Y8          // x
	VANDPD expAbs<>(SB), Y8, Y1
	VMINPD exp104<>(SB), Y1, Y1
	VXORPD expSign<>(SB), Y1, Y1 // -min(|x|, 104)
	EXP4                      // Y5 = e
	VCMPPD $13, Y9, Y8, Y7    // x >= 0
	VMOVUPD expOne<>(SB), Y6
	VBLENDVPD Y7, Y6, Y5, Y6  // numerator: 1 where x >= 0, else e
	VADDPD expOne<>(SB), Y5, Y5
	VDIVPD Y5, Y6, Y6
	VCVTPD2PSY Y6, X6
	VCMPPS $3, X0, X0, X7
	VBLENDVPS X7, X0, X6, X6
	VMOVUPS X6, (DI)
	ADDQ $16, SI
	ADDQ $16, DI
	DECQ CX
	JNZ  logLoop

logDone:
	VZEROUPPER
	RET
