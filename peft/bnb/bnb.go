// Package bnb implements bitsandbytes' 4-bit blockwise quantization, the storage format of QLoRA
// (Dettmers et al. 2023) and of the 4-bit checkpoints Hugging Face transformers writes: the NF4
// and FP4 codes, per-block absmax scales, double quantization of the scales, the host-side
// quantize and dequantize, an in-graph dequantize built from ops GoMLX's pure-Go backend supports,
// and the tensors a checkpoint holds for one quantized weight (see Tensors for the exact layout).
//
// # Quantization
//
// A tensor of n values is flattened row-major in PyTorch order (for a linear weight: [out, in],
// the transpose of this SDK's [in, out] layout) and cut into blocks of BlockSize values (a power
// of two from 32 to 4096; 64 by default). The last block may be shorter, as in bitsandbytes: it
// is neither padded nor refused, its absmax is taken over its own values. For each block:
//
//	absmax = max |x|,   q = code index chosen for x·(1/absmax)   (float32 arithmetic)
//
// and x is restored as code[q]·absmax. The index is chosen the way bitsandbytes' kernels choose it:
// a decision tree whose thresholds are the midpoints between neighbouring codes (as float32
// constants), x exactly on a threshold going to the lower code; an all-zero block (absmax 0) gives NaN·0,
// which the tree maps to index 0, so it dequantizes to ±0 like bitsandbytes' does. Two indices go
// in one byte, the first element in the high nibble: byte = q[2k]<<4 | q[2k+1]. An odd count gets
// a last low nibble that encodes 0, as bitsandbytes' kernel writes it.
//
// NF4's sixteen codes are the published values (NF4Code); FP4's are bitsandbytes' FP4 table
// {0, 0.0625, 8, 12, 4, 6, 2, 3, and their negatives} divided by 12 in float32 (FP4Code).
//
// # Double quantization
//
// The float32 absmax of every block costs 32/BlockSize bits per value. Double quantization
// stores them in 8 bits instead: offset = mean(absmax) (computed in float64, rounded to float32),
// the centred values absmax−offset are quantized blockwise in blocks of 256 with bitsandbytes'
// signed dynamic 8-bit map (DynamicMap), each nested block keeping a float32 absmax; the 8-bit
// index is found with bitsandbytes' binary search over the map. A scale is restored as
// float32(map[q]·nestedAbsmax) + offset, and the 4-bit codes are always chosen with the exact
// absmax (as bitsandbytes does), so the scale's own quantization error adds to the code's.
// Bits per value: 4 + 8/BlockSize + 32/(256·BlockSize) + (32 for the offset)/n ≈ 4.127 for
// blocks of 64 (4.5 without double quantization).
//
// # Checkpoint layout
//
// A Hugging Face 4-bit checkpoint (bitsandbytes' Linear4bit state dict) stores a weight named
// X ("model.layers.0.mlp.up_proj.weight") as these safetensors tensors (Tensors writes them,
// FromTensors reads and checks them), n being the number of values and blocks = ⌈n/blocksize⌉:
//
//	X                                   U8  [(n+1)/2, 1]     packed codes, first element in the high nibble
//	X.absmax                            F32 [blocks]         absmax per block (no double quantization)
//	                                    U8  [blocks]         8-bit codes of absmax−offset (double quantization)
//	X.quant_map                         F32 [16]             the 4-bit code table
//	X.nested_absmax                     F32 [⌈blocks/256⌉]   double quantization only
//	X.nested_quant_map                  F32 [256]            double quantization only: the 8-bit map
//	X.quant_state.bitsandbytes__nf4     U8  [bytes]          the remaining fields as UTF-8 JSON ("__fp4" for FP4)
//
// The JSON is Python's json.dumps of {"quant_type", "blocksize", "dtype", "shape"} and, with
// double quantization, {"nested_blocksize", "nested_dtype", "nested_offset"}, in that order:
// {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 172],
// "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0284...}. shape is the
// PyTorch shape ([out, in]); dtype is the type the weight had before quantization.
//
// Quantize ports bitsandbytes' CUDA kernels (csrc/kernels.cu: kQuantizeBlockwise, dQuantizeNF4,
// dQuantizeFP4, dQuantize) operation by operation in float32, so its packed codes are meant to be
// bitsandbytes' bit for bit. That was not checked against bitsandbytes itself (no PyTorch here);
// the 8-bit map is pinned to bitsandbytes' values by a test. The offset may differ from
// bitsandbytes' in its last bit (bitsandbytes takes the mean with a GPU reduction); the checkpoint
// records it, so a file written here dequantizes identically everywhere.
package bnb

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"sync"
)

// QuantType is a 4-bit data type: NF4 or FP4.
type QuantType string

const (
	// NF4 is 4-bit NormalFloat, QLoRA's data type and the default.
	NF4 QuantType = "nf4"
	// FP4 is bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
	FP4 QuantType = "fp4"
)

// NestedBlockSize is the block size of double quantization: 256 absmax values share one float32
// scale, as in bitsandbytes.
const NestedBlockSize = 256

// Options say how to quantize.
type Options struct {
	// Type is NF4 (default) or FP4.
	Type QuantType `json:"quant_type"`
	// BlockSize is the number of values sharing one absmax: a power of two from 32 to 4096.
	// Default 64.
	BlockSize int `json:"blocksize"`
	// DoubleQuant quantizes the absmax values to 8 bits (default true).
	DoubleQuant bool `json:"double_quant"`
}

// DefaultOptions returns QLoRA's settings: NF4, blocks of 64, double quantization.
func DefaultOptions() Options { return Options{Type: NF4, BlockSize: 64, DoubleQuant: true} }

// Validate checks the options, naming the field that is wrong.
func (o Options) Validate() error {
	if _, err := Code(o.Type); err != nil {
		return err
	}
	return validBlockSize("blocksize", o.BlockSize)
}

// validBlockSize checks that size is a power of two from 32 to 4096.
func validBlockSize(what string, size int) error {
	if size < 32 || size > 4096 || size&(size-1) != 0 {
		return fmt.Errorf("bnb: %s must be a power of two from 32 to 4096, got %d", what, size)
	}
	return nil
}

// nf4Code is NF4's code table, index 0–15 (bitsandbytes' get_4bit_type("nf4")).
var nf4Code = [16]float32{
	-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
	-0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
	0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
	0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
}

// fp4Code is FP4's code table: bitsandbytes' {0, 0.0625, 8, 12, 4, 6, 2, 3, −0, …}/12 in float32.
var fp4Code = func() [16]float32 {
	raw := [8]float32{0, 0.0625, 8, 12, 4, 6, 2, 3}
	var code [16]float32
	for i, v := range raw {
		code[i] = v / 12
		code[i+8] = -v / 12 // index 8 is −0, as in bitsandbytes
	}
	return code
}()

// NF4Code returns NF4's sixteen code values, by index.
func NF4Code() [16]float32 { return nf4Code }

// FP4Code returns FP4's sixteen code values, by index.
func FP4Code() [16]float32 { return fp4Code }

// Code returns the code table of a 4-bit type, or an error for an unknown type.
func Code(t QuantType) ([16]float32, error) {
	switch t {
	case NF4:
		return nf4Code, nil
	case FP4:
		return fp4Code, nil
	}
	return [16]float32{}, fmt.Errorf("bnb: unknown quant type %q (want %q or %q)", t, NF4, FP4)
}

// QuantizeValue returns the 4-bit index of x (a value already divided by its block's absmax) with
// bitsandbytes' decision tree for t (dQuantizeNF4 / dQuantizeFP4): the nearest code, ties to the
// lower one, NaN to index 0.
func QuantizeValue(t QuantType, x float32) uint8 {
	if t == FP4 {
		return quantizeFP4(x)
	}
	return quantizeNF4(x)
}

// quantizeNF4 is bitsandbytes' dQuantizeNF4: thresholds are the midpoints between codes.
func quantizeNF4(x float32) uint8 {
	if x > 0.03979014977812767 {
		if x > 0.3893125355243683 {
			if x > 0.6427869200706482 {
				if x > 0.8614784181118011 {
					return 0b1111
				}
				return 0b1110
			}
			if x > 0.5016634166240692 {
				return 0b1101
			}
			return 0b1100
		}
		if x > 0.2035212516784668 {
			if x > 0.2920137718319893 {
				return 0b1011
			}
			return 0b1010
		}
		if x > 0.1202552504837513 {
			return 0b1001
		}
		return 0b1000
	}
	if x > -0.33967943489551544 {
		if x > -0.13791173323988914 {
			if x > -0.045525018125772476 {
				return 0b0111
			}
			return 0b0110
		}
		if x > -0.23460740596055984 {
			return 0b0101
		}
		return 0b0100
	}
	if x > -0.6106329262256622 {
		if x > -0.4599952697753906 {
			return 0b0011
		}
		return 0b0010
	}
	if x > -0.8480964004993439 {
		return 0b0001
	}
	return 0b0000
}

// quantizeFP4 is bitsandbytes' dQuantizeFP4: a sign bit and a search over |x| with thresholds at
// the midpoints of {0, 0.0625, 2, 3, 4, 6, 8, 12}/12.
func quantizeFP4(x float32) uint8 {
	var sign uint8
	if x < 0 {
		sign = 0b1000
	}
	x = float32(math.Abs(float64(x)))
	if x > 0.29166667 {
		if x > 0.583333 {
			if x > 0.8333333 {
				return 0b0011 + sign
			}
			return 0b0010 + sign
		}
		if x > 0.4166667 {
			return 0b0101 + sign
		}
		return 0b0100 + sign
	}
	if x > 0.0859375 {
		if x > 0.20833333 {
			return 0b0111 + sign
		}
		return 0b0110 + sign
	}
	if x > 0.00260417 {
		return 0b0001 + sign
	}
	return 0b0000 + sign
}

var (
	dynamicOnce sync.Once
	dynamicMap  [256]float32
)

// DynamicMap returns bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)),
// the code double quantization stores scales with: 127 negative values, 0, 127 positive values
// and 1.0, sorted, from −0.99296875 to 1.
//
// It is computed as bitsandbytes computes it in float32: for i = 0…6, the means of neighbouring
// points of torch.linspace(0.1, 1, 2^i+1), times ±10^(i−6). PyTorch's linspace takes start+step·k
// for the first half and end−step·(steps−1−k) for the second, each a fused multiply-add; the
// result is pinned by a test against the map bitsandbytes produces.
func DynamicMap() [256]float32 {
	dynamicOnce.Do(func() {
		var data []float64
		for i := range 7 {
			points := linspace(0.1, 1, 1<<i+1)
			scale := float32(math.Pow10(i - 6))
			for _, sign := range []float32{1, -1} {
				for j := 0; j+1 < len(points); j++ {
					mean := (points[j] + points[j+1]) / 2
					data = append(data, float64(float32(sign*scale)*mean))
				}
			}
		}
		data = append(data, 0, 1)
		sort.Float64s(data)
		for i, v := range data {
			dynamicMap[i] = float32(v)
		}
	})
	return dynamicMap
}

// linspace is torch.linspace(start, end, steps) in float32 as PyTorch computes it.
func linspace(start, end float32, steps int) []float32 {
	step := (end - start) / float32(steps-1)
	half := steps / 2
	out := make([]float32, steps)
	for k := range out {
		if k < half {
			out[k] = fma32(step, float32(k), start)
		} else {
			out[k] = fma32(-step, float32(steps-k-1), end)
		}
	}
	return out
}

// fma32 is a·b+c rounded once to float32 (exact here: the float64 result has no rounding for the
// small integers b this package uses).
func fma32(a, b, c float32) float32 {
	return float32(math.FMA(float64(a), float64(b), float64(c)))
}

// quantize8 returns the index of x in the sorted 256-entry map code with bitsandbytes' dQuantize
// (non-stochastic): a binary search from the middle, then the nearer of the two neighbours by
// their float32 midpoint.
func quantize8(code *[256]float32, x float32) uint8 {
	pivot, upperPivot, lowerPivot := 127, 255, 0
	lower, upper := float32(-1), float32(1)
	val := code[pivot]
	for i := 64; i > 0; i >>= 1 {
		if x > val {
			lowerPivot, lower = pivot, val
			pivot += i
		} else {
			upperPivot, upper = pivot, val
			pivot -= i
		}
		val = code[pivot]
	}
	if upperPivot == 255 {
		upper = code[upperPivot]
	}
	if lowerPivot == 0 {
		lower = code[lowerPivot]
	}
	if x > val {
		if midpoint := float32(upper+val) * 0.5; x > midpoint {
			return uint8(upperPivot)
		}
		return uint8(pivot)
	}
	if midpoint := float32(lower+val) * 0.5; x < midpoint {
		return uint8(lowerPivot)
	}
	return uint8(pivot)
}

// Nested holds the double-quantized absmax values of a Quantized tensor.
type Nested struct {
	// Codes are the 8-bit indices into Map of absmax−Offset, one per block (bitsandbytes' absmax
	// of a nested quant state).
	Codes []uint8
	// Absmax is the float32 scale of each group of BlockSize codes (nested_absmax).
	Absmax []float32
	// BlockSize is the number of codes sharing one Absmax (nested_blocksize; 256).
	BlockSize int
	// Offset is added back to every restored absmax (nested_offset).
	Offset float32
	// Map is the 8-bit code the indices refer to (nested_quant_map; DynamicMap when quantized
	// here, whatever the checkpoint holds when read).
	Map [256]float32
}

// Quantized is a tensor in bitsandbytes' 4-bit format.
type Quantized struct {
	// Type is NF4 or FP4.
	Type QuantType
	// BlockSize is the number of values sharing one absmax.
	BlockSize int
	// Shape is the tensor's shape in PyTorch order ([out, in] for a linear weight).
	Shape []int
	// DType is the element type of the tensor that was quantized, as bitsandbytes records it
	// ("float32", "float16" or "bfloat16"). Dequantize always gives float32.
	DType string
	// Packed holds two 4-bit indices per byte, the first element in the high nibble:
	// (n+1)/2 bytes for n values.
	Packed []uint8
	// Absmax holds the float32 absmax of each block, when the scales are not double quantized.
	Absmax []float32
	// Nested holds the double-quantized scales instead (Absmax is then nil).
	Nested *Nested
}

// Options returns the options the tensor was quantized with.
func (q *Quantized) Options() Options {
	return Options{Type: q.Type, BlockSize: q.BlockSize, DoubleQuant: q.Nested != nil}
}

// Len returns the number of values.
func (q *Quantized) Len() int {
	n := 1
	for _, d := range q.Shape {
		n *= d
	}
	return n
}

// Blocks returns the number of blocks: ⌈Len/BlockSize⌉.
func (q *Quantized) Blocks() int { return ceilDiv(q.Len(), q.BlockSize) }

func ceilDiv(a, b int) int { return (a + b - 1) / b }

// Bytes returns the bytes the quantized tensor takes in memory: the packed codes and the scales
// (the offset counts 4 bytes; the shared code tables are not counted).
func (q *Quantized) Bytes() int64 {
	total := int64(len(q.Packed)) + 4*int64(len(q.Absmax))
	if q.Nested != nil {
		total += int64(len(q.Nested.Codes)) + 4*int64(len(q.Nested.Absmax)) + 4
	}
	return total
}

// Quantize quantizes values, the row-major elements of a tensor shaped shape in PyTorch order
// (for a linear weight, [out, in]), with opts. Non-finite values are an error.
func Quantize(values []float32, shape []int, opts Options) (*Quantized, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	n := 1
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("bnb: negative dimension in shape %v", shape)
		}
		n *= d
	}
	if n != len(values) {
		return nil, fmt.Errorf("bnb: shape %v holds %d values, got %d", shape, n, len(values))
	}
	if n == 0 {
		return nil, errors.New("bnb: cannot quantize an empty tensor")
	}
	for i, v := range values {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil, fmt.Errorf("bnb: value %d is %v: only finite values can be quantized", i, v)
		}
	}
	bs := opts.BlockSize
	blocks := ceilDiv(n, bs)
	absmax := make([]float32, blocks)
	packed := make([]uint8, (n+1)/2)
	var inv float32
	for b := range blocks {
		block := values[b*bs : min((b+1)*bs, n)]
		var amax float32
		for _, v := range block {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		absmax[b] = amax
		inv = 1 / amax
		for k, v := range block {
			i := b*bs + k
			code := QuantizeValue(opts.Type, float32(v*inv))
			if i%2 == 0 {
				packed[i/2] = code << 4
			} else {
				packed[i/2] |= code
			}
		}
	}
	if n%2 == 1 { // the kernel quantizes the zero padding of the last block into the low nibble
		packed[n/2] |= QuantizeValue(opts.Type, float32(0*inv))
	}
	q := &Quantized{Type: opts.Type, BlockSize: bs, Shape: slices.Clone(shape), DType: "float32", Packed: packed}
	if opts.DoubleQuant {
		q.Nested = quantizeAbsmax(absmax)
	} else {
		q.Absmax = absmax
	}
	return q, nil
}

// quantizeAbsmax double-quantizes the absmax values (bitsandbytes' quantize_blockwise with
// blocksize 256 of absmax − mean(absmax)).
func quantizeAbsmax(absmax []float32) *Nested {
	var sum float64
	for _, a := range absmax {
		sum += float64(a)
	}
	offset := float32(sum / float64(len(absmax)))
	nested := &Nested{
		Codes:     make([]uint8, len(absmax)),
		Absmax:    make([]float32, ceilDiv(len(absmax), NestedBlockSize)),
		BlockSize: NestedBlockSize,
		Offset:    offset,
		Map:       DynamicMap(),
	}
	for b := range nested.Absmax {
		lo, hi := b*NestedBlockSize, min((b+1)*NestedBlockSize, len(absmax))
		centred := make([]float32, hi-lo)
		var amax float32
		for k, a := range absmax[lo:hi] {
			centred[k] = a - offset
			amax = max(amax, float32(math.Abs(float64(centred[k]))))
		}
		nested.Absmax[b] = amax
		inv := 1 / amax
		for k, c := range centred {
			nested.Codes[lo+k] = quantize8(&nested.Map, float32(c*inv))
		}
	}
	return nested
}

// Scales returns the float32 absmax of every block as dequantization uses it: Absmax, or for
// double quantization float32(Map[code]·nestedAbsmax) + Offset.
func (q *Quantized) Scales() []float32 {
	if q.Nested == nil {
		return slices.Clone(q.Absmax)
	}
	nd := q.Nested
	scales := make([]float32, len(nd.Codes))
	for i, c := range nd.Codes {
		scales[i] = float32(nd.Map[c]*nd.Absmax[i/nd.BlockSize]) + nd.Offset
	}
	return scales
}

// Dequantize returns the n values code[q]·scale in float32, row-major in PyTorch order. q must
// be valid (Validate; FromTensors and Quantize guarantee it).
func (q *Quantized) Dequantize() []float32 {
	code, _ := Code(q.Type)
	scales := q.Scales()
	n := q.Len()
	out := make([]float32, n)
	for i := range out {
		nibble := q.Packed[i/2] >> 4
		if i%2 == 1 {
			nibble = q.Packed[i/2] & 0x0F
		}
		out[i] = float32(code[nibble] * scales[i/q.BlockSize])
	}
	return out
}

// Validate checks that the parts of q agree with each other: a known type, a valid block size,
// a non-empty shape, (n+1)/2 packed bytes, one scale per block, one nested scale per nested block.
func (q *Quantized) Validate() error {
	if _, err := Code(q.Type); err != nil {
		return err
	}
	if err := validBlockSize("blocksize", q.BlockSize); err != nil {
		return err
	}
	n := 1
	for _, d := range q.Shape {
		if d <= 0 {
			return fmt.Errorf("bnb: shape %v has a dimension ≤ 0", q.Shape)
		}
		if n > math.MaxInt32/d {
			return fmt.Errorf("bnb: shape %v is too large", q.Shape)
		}
		n *= d
	}
	if len(q.Packed) != (n+1)/2 {
		return fmt.Errorf("bnb: shape %v needs %d packed bytes, got %d", q.Shape, (n+1)/2, len(q.Packed))
	}
	blocks := ceilDiv(n, q.BlockSize)
	if q.Nested == nil {
		if len(q.Absmax) != blocks {
			return fmt.Errorf("bnb: shape %v in blocks of %d needs %d absmax values, got %d", q.Shape, q.BlockSize, blocks, len(q.Absmax))
		}
		return nil
	}
	if q.Absmax != nil {
		return errors.New("bnb: both float32 absmax and double-quantized absmax are set")
	}
	nd := q.Nested
	if len(nd.Codes) != blocks {
		return fmt.Errorf("bnb: shape %v in blocks of %d needs %d quantized absmax values, got %d", q.Shape, q.BlockSize, blocks, len(nd.Codes))
	}
	if err := validBlockSize("nested_blocksize", nd.BlockSize); err != nil {
		return err
	}
	if want := ceilDiv(blocks, nd.BlockSize); len(nd.Absmax) != want {
		return fmt.Errorf("bnb: %d absmax values in nested blocks of %d need %d nested_absmax values, got %d", blocks, nd.BlockSize, want, len(nd.Absmax))
	}
	return nil
}
