package bnb_test

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"math"
	"slices"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/bnb"
)

// The NF4 table is the published one (METHODS.md, bitsandbytes' get_4bit_type("nf4")), FP4's is
// bitsandbytes' {0, 0.0625, 8, 12, 4, 6, 2, 3, −0, …}/12.
func TestCodeTables(t *testing.T) {
	published := []float64{-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
		-0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534,
		0.16093020141124725, 0.24611230194568634, 0.33791524171829224, 0.44070982933044434,
		0.5626170039176941, 0.7229568362236023, 1.0}
	nf4 := bnb.NF4Code()
	for i, v := range published {
		require.Equal(t, float32(v), nf4[i], "NF4 code %d", i)
	}
	fp4 := bnb.FP4Code()
	for i, v := range []float64{0, 0.0625, 8, 12, 4, 6, 2, 3} {
		require.Equal(t, float32(v/12), fp4[i], "FP4 code %d", i)
		require.Equal(t, float32(-v/12), fp4[i+8], "FP4 code %d", i+8)
	}
	require.True(t, math.Signbit(float64(fp4[8])), "FP4 index 8 is −0")
	_, err := bnb.Code("int4")
	require.ErrorContains(t, err, `unknown quant type "int4"`)
}

// DynamicMap is bitsandbytes' create_dynamic_map(signed=True) bit for bit: the SHA-256 below is
// that of the 256 float32 values (little-endian) of the map bitsandbytes produces, as printed from
// a bitsandbytes quant state.
func TestDynamicMap(t *testing.T) {
	m := bnb.DynamicMap()
	buf := make([]byte, 4*len(m))
	for i, v := range m {
		binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
	}
	sum := sha256.Sum256(buf)
	require.Equal(t, "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c", hex.EncodeToString(sum[:]))
	require.Equal(t, float32(-0.992968738079071), m[0])
	require.Equal(t, float32(0), m[127])
	require.Equal(t, float32(5.500000384017767e-07), m[128])
	require.Equal(t, float32(1), m[255])
	require.True(t, slices.IsSorted(m[:]))
	for i := range 127 {
		require.Equal(t, -m[254-i], m[i], "the map is symmetric but for 1.0")
	}
}

func nearest(code [16]float32, x float32) float64 {
	best := math.Inf(1)
	for _, c := range code {
		best = math.Min(best, math.Abs(float64(x)-float64(c)))
	}
	return best
}

// The decision trees pick a nearest code, ties (x exactly on a float32 midpoint) to the lower
// code, for every value in [-1, 1] probed and around every midpoint.
func TestQuantizeValueIsNearest(t *testing.T) {
	for _, qt := range []bnb.QuantType{bnb.NF4, bnb.FP4} {
		t.Run(string(qt), func(t *testing.T) {
			code, err := bnb.Code(qt)
			require.NoError(t, err)
			probe := []float32{0, 1, -1}
			rng := peft.NewRand(1)
			for range 20000 {
				probe = append(probe, float32(2*rng.Float64()-1))
			}
			sorted := slices.Clone(code[:])
			slices.Sort(sorted)
			for i := 0; i+1 < len(sorted); i++ {
				mid := float32((float64(sorted[i]) + float64(sorted[i+1])) / 2)
				probe = append(probe, mid, math.Nextafter32(mid, 2), math.Nextafter32(mid, -2))
			}
			for _, x := range probe {
				q := bnb.QuantizeValue(qt, x)
				require.Less(t, int(q), 16)
				got := math.Abs(float64(x) - float64(code[q]))
				require.InDelta(t, nearest(code, x), got, 2e-7, "x=%v picked code %d (%v)", x, q, code[q])
			}
			if qt == bnb.NF4 {
				// The switch from code i to i+1 happens within one float32 step of their midpoint
				// (bitsandbytes' thresholds are the midpoints of the decimal values).
				for i := 0; i+1 < 16; i++ {
					mid := float32((float64(code[i]) + float64(code[i+1])) / 2)
					below := math.Nextafter32(math.Nextafter32(mid, -2), -2)
					above := math.Nextafter32(math.Nextafter32(mid, 2), 2)
					require.Equal(t, uint8(i), bnb.QuantizeValue(qt, below), "just below the midpoint of %d and %d", i, i+1)
					require.Equal(t, uint8(i+1), bnb.QuantizeValue(qt, above), "just above the midpoint of %d and %d", i, i+1)
				}
			}
		})
	}
}

// Codes 1 and 14 pack into 0x1E: the first element goes in the high nibble.
func TestPackingOrder(t *testing.T) {
	code := bnb.NF4Code()
	values := make([]float32, 32) // one block of 32; zeros are code 7
	values[0], values[1], values[2] = code[1], code[14], 1
	q, err := bnb.Quantize(values, []int{1, 32}, bnb.Options{Type: bnb.NF4, BlockSize: 32})
	require.NoError(t, err)
	require.Equal(t, []float32{1}, q.Absmax)
	require.Equal(t, uint8(0x1E), q.Packed[0])
	require.Equal(t, uint8(0xF7), q.Packed[1])
	require.Equal(t, uint8(0x77), q.Packed[15])
	require.Equal(t, values, q.Dequantize())
}

// maxHalfGap is half the largest distance between neighbouring values of a sorted table.
func maxHalfGap(table []float32) float64 {
	sorted := slices.Clone(table)
	slices.Sort(sorted)
	var g float64
	for i := 0; i+1 < len(sorted); i++ {
		g = math.Max(g, float64(sorted[i+1])-float64(sorted[i]))
	}
	return g / 2
}

type quantCase struct {
	name  string
	opts  bnb.Options
	shape []int
	scale float64
}

var quantCases = []quantCase{
	{"nf4 64 dq", bnb.DefaultOptions(), []int{48, 64}, 0.02},
	{"nf4 64", bnb.Options{Type: bnb.NF4, BlockSize: 64}, []int{48, 64}, 0.02},
	{"fp4 64 dq", bnb.Options{Type: bnb.FP4, BlockSize: 64, DoubleQuant: true}, []int{48, 64}, 0.02},
	{"fp4 128", bnb.Options{Type: bnb.FP4, BlockSize: 128}, []int{32, 40}, 3},
	{"nf4 32 dq, 300 nested blocks", bnb.Options{Type: bnb.NF4, BlockSize: 32, DoubleQuant: true}, []int{300, 256}, 1},
	{"nf4 4096 dq, partial last block", bnb.Options{Type: bnb.NF4, BlockSize: 4096, DoubleQuant: true}, []int{172, 64}, 0.05},
	{"nf4 64 dq, odd count", bnb.Options{Type: bnb.NF4, BlockSize: 64, DoubleQuant: true}, []int{7, 37}, 0.1},
	{"fp4 32, odd count", bnb.Options{Type: bnb.FP4, BlockSize: 32}, []int{5, 13}, 0.1},
	{"nf4 64 dq, one value", bnb.DefaultOptions(), []int{1, 1}, 1},
}

func (c quantCase) values(seed uint64) []float32 {
	n := 1
	for _, d := range c.shape {
		n *= d
	}
	values := peft.Normal(peft.NewRand(seed), n, c.scale)
	for i := 0; i < n; i += 97 { // outliers, as real weights have
		values[i] *= 8
	}
	return values
}

// dequantize(quantize(x)) is within absmax × half the largest code gap of x in every block, plus
// the error of the block's restored scale, which is itself within the nested absmax × half the
// largest gap of the 8-bit map (plus float32 rounding).
func TestQuantizeErrorBound(t *testing.T) {
	for _, tc := range quantCases {
		t.Run(tc.name, func(t *testing.T) {
			values := tc.values(3)
			q, err := bnb.Quantize(values, tc.shape, tc.opts)
			require.NoError(t, err)
			require.NoError(t, q.Validate())
			require.Equal(t, tc.opts, q.Options())
			require.Len(t, q.Packed, (len(values)+1)/2)
			code, _ := bnb.Code(tc.opts.Type)
			gap4 := maxHalfGap(code[:])
			dyn := bnb.DynamicMap()
			gap8 := maxHalfGap(dyn[:])
			scales := q.Scales()
			out := q.Dequantize()
			bs := tc.opts.BlockSize
			for b := range q.Blocks() {
				block := values[b*bs : min((b+1)*bs, len(values))]
				var amax float64
				for _, v := range block {
					amax = math.Max(amax, math.Abs(float64(v)))
				}
				scaleErr := math.Abs(amax - float64(scales[b]))
				if q.Nested == nil {
					require.Equal(t, float32(amax), scales[b])
				} else {
					nb := q.Nested.Absmax[b/q.Nested.BlockSize]
					require.LessOrEqual(t, scaleErr, float64(nb)*gap8+1e-6*amax, "block %d scale", b)
				}
				for k, v := range block {
					i := b*bs + k
					bound := amax*gap4 + scaleErr + 1e-6*amax
					require.LessOrEqual(t, math.Abs(float64(v)-float64(out[i])), bound, "value %d (block %d)", i, b)
				}
			}
			// Re-quantizing the dequantized values of a tensor without double quantization
			// gives the same values: the absmax element maps to ±1 and every other to its own
			// code (the same bytes for NF4; FP4's −0 comes back as +0).
			if q.Nested == nil {
				again, err := bnb.Quantize(out, tc.shape, tc.opts)
				require.NoError(t, err)
				require.Equal(t, q.Absmax, again.Absmax)
				require.Equal(t, out, again.Dequantize())
				if tc.opts.Type == bnb.NF4 {
					require.Equal(t, q.Packed, again.Packed)
				}
			}
		})
	}
}

// The stored bytes cost 4 + 8/64 + 32/(64·256) bits per value with double quantization (plus the
// 4-byte offset) and 4.5 without.
func TestBitsPerValue(t *testing.T) {
	values := peft.Normal(peft.NewRand(1), 512*512, 0.02)
	q, err := bnb.Quantize(values, []int{512, 512}, bnb.DefaultOptions())
	require.NoError(t, err)
	require.Equal(t, int64(512*512/2+512*512/64+4*512*512/64/256+4), q.Bytes())
	require.LessOrEqual(t, 8*float64(q.Bytes())/(512*512), 4.13)
	q, err = bnb.Quantize(values, []int{512, 512}, bnb.Options{Type: bnb.NF4, BlockSize: 64})
	require.NoError(t, err)
	require.Equal(t, 4.5, 8*float64(q.Bytes())/(512*512))
}

// An all-zero block has absmax 0: bitsandbytes' NaN·0 path gives index 0 and values ±0.
func TestZeroBlock(t *testing.T) {
	values := make([]float32, 128)
	values[100] = 0.5
	q, err := bnb.Quantize(values, []int{2, 64}, bnb.Options{Type: bnb.NF4, BlockSize: 64})
	require.NoError(t, err)
	require.Equal(t, []float32{0, 0.5}, q.Absmax)
	require.Equal(t, uint8(0x00), q.Packed[0])
	for i, v := range q.Dequantize() {
		require.Equal(t, float64(values[i]), math.Abs(float64(v)), "value %d", i)
	}
}

func TestBadQuantizeInput(t *testing.T) {
	ok := bnb.DefaultOptions()
	for _, tc := range []struct {
		name   string
		values []float32
		shape  []int
		opts   bnb.Options
		want   string
	}{
		{"block size not a power of two", make([]float32, 96), []int{96}, bnb.Options{Type: bnb.NF4, BlockSize: 48}, "blocksize must be a power of two from 32 to 4096, got 48"},
		{"block size too small", make([]float32, 96), []int{96}, bnb.Options{Type: bnb.NF4, BlockSize: 16}, "got 16"},
		{"block size too large", make([]float32, 96), []int{96}, bnb.Options{Type: bnb.NF4, BlockSize: 8192}, "got 8192"},
		{"block size zero", make([]float32, 96), []int{96}, bnb.Options{Type: bnb.NF4}, "got 0"},
		{"unknown type", make([]float32, 96), []int{96}, bnb.Options{Type: "int4", BlockSize: 64}, `unknown quant type "int4"`},
		{"shape mismatch", make([]float32, 96), []int{10, 10}, ok, "shape [10 10] holds 100 values, got 96"},
		{"empty", nil, []int{0, 4}, ok, "empty tensor"},
		{"NaN", []float32{1, float32(math.NaN())}, []int{2}, ok, "value 1 is NaN"},
		{"Inf", []float32{float32(math.Inf(-1))}, []int{1}, ok, "value 0 is -Inf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := bnb.Quantize(tc.values, tc.shape, tc.opts)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// The in-graph dequantization equals the host's bit for bit, for every layout: both kinds of
// scale, partial last blocks, odd counts and nested block counts that are not multiples of 256.
func TestDequantizeGraphEqualsHost(t *testing.T) {
	b, err := backend.Get()
	require.NoError(t, err)
	for _, tc := range quantCases {
		t.Run(tc.name, func(t *testing.T) {
			q, err := bnb.Quantize(tc.values(5), tc.shape, tc.opts)
			require.NoError(t, err)
			exec, err := graph.NewExec(b, func(g *graph.Graph) *graph.Node {
				nodes := bnb.Nodes{Packed: graph.Const(g, q.Packed)}
				if q.Nested != nil {
					nodes.Absmax = graph.Const(g, q.Nested.Codes)
					nodes.NestedAbsmax = graph.Const(g, q.Nested.Absmax)
					nodes.Offset = graph.Const(g, q.Nested.Offset)
				} else {
					nodes.Absmax = graph.Const(g, q.Absmax)
				}
				return bnb.DequantizeGraph(q.Layout(), nodes)
			})
			require.NoError(t, err)
			out, err := exec.Exec()
			require.NoError(t, err)
			got := out[0].Value().([]float32)
			want := q.Dequantize()
			require.Len(t, got, len(want))
			for i := range want {
				require.Equal(t, math.Float32bits(want[i]), math.Float32bits(got[i]), "value %d: host %v, graph %v", i, want[i], got[i])
			}
		})
	}
}
