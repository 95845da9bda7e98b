package bnb

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"peft/peft/safetensors"
)

// Suffixes of the tensors bitsandbytes stores beside a 4-bit weight named X ("X.weight" in a
// Hugging Face checkpoint): X.absmax, X.quant_map, X.nested_absmax, X.nested_quant_map and
// X.quant_state.bitsandbytes__<type>.
const (
	SuffixAbsmax         = ".absmax"
	SuffixQuantMap       = ".quant_map"
	SuffixNestedAbsmax   = ".nested_absmax"
	SuffixNestedQuantMap = ".nested_quant_map"
	// SuffixQuantState is followed by the quant type: ".quant_state.bitsandbytes__nf4".
	SuffixQuantState = ".quant_state.bitsandbytes__"
)

// Tensors returns the tensors a Hugging Face 4-bit checkpoint (bitsandbytes' Linear4bit state
// dict, QuantState.as_dict(packed=True)) holds for the weight called name, e.g.
// "model.layers.0.mlp.up_proj.weight":
//
//	name                                    U8  [(n+1)/2, 1]   packed codes, first element high nibble
//	name.absmax                             F32 [blocks]       per-block absmax (no double quantization)
//	                                        U8  [blocks]       8-bit codes of absmax−offset (double quantization)
//	name.quant_map                          F32 [16]           the 4-bit code table (NF4Code or FP4Code)
//	name.nested_absmax                      F32 [⌈blocks/256⌉]  double quantization only
//	name.nested_quant_map                   F32 [256]          double quantization only (DynamicMap)
//	name.quant_state.bitsandbytes__nf4      U8  [len(json)]    the other fields as UTF-8 JSON ("…__fp4" for FP4)
//
// The JSON is Python's json.dumps of {"quant_type", "blocksize", "dtype", "shape"} followed, with
// double quantization, by {"nested_blocksize", "nested_dtype", "nested_offset"}, in that order,
// e.g. {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64],
// "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0347}. blocks is
// ⌈n/blocksize⌉ and n the product of shape.
func (q *Quantized) Tensors(name string) ([]safetensors.Tensor, error) {
	if err := q.Validate(); err != nil {
		return nil, fmt.Errorf("bnb: %s: %w", name, err)
	}
	code, _ := Code(q.Type)
	out := []safetensors.Tensor{
		safetensors.FromUint8(name, []int{len(q.Packed), 1}, q.Packed),
		safetensors.FromFloat32(name+SuffixQuantMap, []int{16}, code[:]),
	}
	var state bytes.Buffer
	fmt.Fprintf(&state, `{"quant_type": %q, "blocksize": %d, "dtype": %q, "shape": [`, q.Type, q.BlockSize, q.dtype())
	for i, d := range q.Shape {
		if i > 0 {
			state.WriteString(", ")
		}
		state.WriteString(strconv.Itoa(d))
	}
	state.WriteString("]")
	if nd := q.Nested; nd != nil {
		out = append(out,
			safetensors.FromUint8(name+SuffixAbsmax, []int{len(nd.Codes)}, nd.Codes),
			safetensors.FromFloat32(name+SuffixNestedAbsmax, []int{len(nd.Absmax)}, nd.Absmax),
			safetensors.FromFloat32(name+SuffixNestedQuantMap, []int{256}, nd.Map[:]))
		fmt.Fprintf(&state, `, "nested_blocksize": %d, "nested_dtype": "float32", "nested_offset": %s`,
			nd.BlockSize, pythonFloat(float64(nd.Offset)))
	} else {
		out = append(out, safetensors.FromFloat32(name+SuffixAbsmax, []int{len(q.Absmax)}, q.Absmax))
	}
	state.WriteString("}")
	out = append(out, safetensors.FromUint8(name+SuffixQuantState+string(q.Type), []int{state.Len()}, state.Bytes()))
	return out, nil
}

func (q *Quantized) dtype() string {
	if q.DType == "" {
		return "float32"
	}
	return q.DType
}

// pythonFloat formats v as Python's repr(float) does: the shortest digits that read back as v,
// in positional notation when the decimal exponent is in [-4, 16), with ".0" for whole numbers,
// else as d.ddde±XX.
func pythonFloat(v float64) string {
	switch {
	case math.IsNaN(v): // json.dumps' spelling; a mean of finite values is never NaN
		return "NaN"
	case math.IsInf(v, 1):
		return "Infinity"
	case math.IsInf(v, -1):
		return "-Infinity"
	}
	s := strconv.FormatFloat(v, 'e', -1, 64) // d.ddde±XX
	mant, expStr, _ := strings.Cut(s, "e")
	exp, _ := strconv.Atoi(expStr)
	neg := strings.HasPrefix(mant, "-")
	digits := strings.Replace(strings.TrimPrefix(mant, "-"), ".", "", 1)
	sign := ""
	if neg {
		sign = "-"
	}
	decpt := exp + 1
	switch {
	case v == 0:
		return sign + "0.0"
	case decpt > -4 && decpt <= 16:
		if decpt <= 0 {
			return sign + "0." + strings.Repeat("0", -decpt) + digits
		}
		if decpt >= len(digits) {
			return sign + digits + strings.Repeat("0", decpt-len(digits)) + ".0"
		}
		return sign + digits[:decpt] + "." + digits[decpt:]
	default:
		m := digits[:1]
		if len(digits) > 1 {
			m += "." + digits[1:]
		}
		es := "+"
		if exp < 0 {
			es, exp = "-", -exp
		}
		return fmt.Sprintf("%s%se%s%02d", sign, m, es, exp)
	}
}

// quantState is the JSON of the packed quant state.
type quantState struct {
	QuantType       *string  `json:"quant_type"`
	BlockSize       *int     `json:"blocksize"`
	DType           *string  `json:"dtype"`
	Shape           []int    `json:"shape"`
	NestedBlockSize *int     `json:"nested_blocksize"`
	NestedDType     *string  `json:"nested_dtype"`
	NestedOffset    *float64 `json:"nested_offset"`
}

// QuantizedNames lists, sorted, the names of the 4-bit weights in f: every X for which f holds
// X.quant_state.bitsandbytes__<type>.
func QuantizedNames(f *safetensors.File) []string {
	var names []string
	for _, t := range f.Tensors {
		if i := strings.LastIndex(t.Name, SuffixQuantState); i > 0 {
			names = append(names, t.Name[:i])
		}
	}
	sort.Strings(names)
	return names
}

// FromTensors reads the 4-bit weight called name from f (the layout Tensors documents) and checks
// that its parts agree: the quant state's type matches its key and is NF4 or FP4, the block sizes
// are valid, the packed bytes, absmax and nested absmax have the counts the shape implies and the
// dtypes Tensors writes, quant_map is the type's code table, double quantization has all its
// parts (or none of them), and no other tensor is named name.<something>. Any disagreement is an
// error that names the tensor.
func FromTensors(f *safetensors.File, name string) (*Quantized, error) {
	var beside []*safetensors.Tensor
	for i := range f.Tensors {
		if strings.HasPrefix(f.Tensors[i].Name, name+".") {
			beside = append(beside, &f.Tensors[i])
		}
	}
	return fromTensors(f, name, beside)
}

// fromTensors is FromTensors given the tensors named name.<something>.
func fromTensors(f *safetensors.File, name string, beside []*safetensors.Tensor) (*Quantized, error) {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("bnb: %s: %s", name, fmt.Sprintf(format, args...))
	}
	get := func(suffix string) *safetensors.Tensor {
		t, _ := f.Get(name + suffix)
		return t
	}
	var stateTensor *safetensors.Tensor
	for _, t := range beside {
		rest := strings.TrimPrefix(t.Name, name+".")
		switch {
		case strings.HasPrefix("."+rest, SuffixQuantState):
			if stateTensor != nil {
				return nil, fail("more than one quant_state tensor (%s and %s)", stateTensor.Name, t.Name)
			}
			stateTensor = t
		case "."+rest == SuffixAbsmax, "."+rest == SuffixQuantMap, "."+rest == SuffixNestedAbsmax, "."+rest == SuffixNestedQuantMap:
		default:
			return nil, fail("unexpected tensor %s beside a 4-bit weight", t.Name)
		}
	}
	if stateTensor == nil {
		return nil, fail("no %s<type> tensor: not a bitsandbytes 4-bit weight", SuffixQuantState)
	}
	keyType := QuantType(strings.TrimPrefix(stateTensor.Name, name+SuffixQuantState))
	if _, err := Code(keyType); err != nil {
		return nil, fail("%s: %v", stateTensor.Name, err)
	}
	if stateTensor.DType != safetensors.U8 {
		return nil, fail("%s is %s, want U8 (UTF-8 JSON)", stateTensor.Name, stateTensor.DType)
	}
	dec := json.NewDecoder(bytes.NewReader(stateTensor.Data))
	dec.DisallowUnknownFields()
	var st quantState
	if err := dec.Decode(&st); err != nil {
		return nil, fail("%s is not the JSON quant state: %v", stateTensor.Name, err)
	}
	if st.QuantType == nil || st.BlockSize == nil || st.Shape == nil {
		return nil, fail("quant state %s lacks quant_type, blocksize or shape", stateTensor.Data)
	}
	if QuantType(*st.QuantType) != keyType {
		return nil, fail("quant state says quant_type %q but its key says %q", *st.QuantType, keyType)
	}
	q := &Quantized{Type: keyType, BlockSize: *st.BlockSize, Shape: st.Shape, DType: "float32"}
	if st.DType != nil {
		switch *st.DType {
		case "float32", "float16", "bfloat16":
			q.DType = *st.DType
		default:
			return nil, fail("quant state dtype %q is not float32, float16 or bfloat16", *st.DType)
		}
	}
	if err := validBlockSize("blocksize", q.BlockSize); err != nil {
		return nil, fail("%v", err)
	}
	n := 1
	for _, d := range q.Shape {
		if d <= 0 || n > math.MaxInt32/d {
			return nil, fail("quant state shape %v is not a valid shape", q.Shape)
		}
		n *= d
	}
	blocks := ceilDiv(n, q.BlockSize)

	packed := get("")
	if packed == nil {
		return nil, fail("the packed weight tensor is missing")
	}
	if packed.DType != safetensors.U8 {
		return nil, fail("packed weight is %s, want U8 (other quant_storage types are not supported)", packed.DType)
	}
	if len(packed.Data) != (n+1)/2 {
		return nil, fail("packed weight has %d bytes, the quant state's shape %v needs %d", len(packed.Data), q.Shape, (n+1)/2)
	}
	q.Packed = append([]uint8(nil), packed.Data...)

	quantMap := get(SuffixQuantMap)
	if quantMap == nil {
		return nil, fail("%s is missing", name+SuffixQuantMap)
	}
	values, err := float32s(quantMap, 16)
	if err != nil {
		return nil, fail("%v", err)
	}
	code, _ := Code(q.Type)
	for i, v := range values {
		if math.Float32bits(v) != math.Float32bits(code[i]) {
			return nil, fail("quant_map[%d] is %v, the %s code has %v", i, v, q.Type, code[i])
		}
	}

	absmax := get(SuffixAbsmax)
	if absmax == nil {
		return nil, fail("%s is missing", name+SuffixAbsmax)
	}
	nestedAbsmax, nestedMap := get(SuffixNestedAbsmax), get(SuffixNestedQuantMap)
	nested := st.NestedBlockSize != nil || st.NestedOffset != nil || st.NestedDType != nil || nestedAbsmax != nil || nestedMap != nil
	if !nested {
		if q.Absmax, err = float32s(absmax, blocks); err != nil {
			return nil, fail("%v (shape %v in blocks of %d)", err, q.Shape, q.BlockSize)
		}
		return q, q.Validate()
	}
	if st.NestedBlockSize == nil || st.NestedOffset == nil || nestedAbsmax == nil || nestedMap == nil {
		return nil, fail("double quantization is incomplete: it needs nested_blocksize and nested_offset in the quant state and the tensors %s and %s",
			name+SuffixNestedAbsmax, name+SuffixNestedQuantMap)
	}
	if st.NestedDType != nil && *st.NestedDType != "float32" {
		return nil, fail("nested_dtype %q is not float32", *st.NestedDType)
	}
	nd := &Nested{BlockSize: *st.NestedBlockSize, Offset: float32(*st.NestedOffset)}
	if err := validBlockSize("nested_blocksize", nd.BlockSize); err != nil {
		return nil, fail("%v", err)
	}
	if absmax.DType != safetensors.U8 || len(absmax.Data) != blocks {
		return nil, fail("%s is %s%v, double quantization of %d blocks needs U8[%d]", absmax.Name, absmax.DType, absmax.Shape, blocks, blocks)
	}
	nd.Codes = append([]uint8(nil), absmax.Data...)
	if nd.Absmax, err = float32s(nestedAbsmax, ceilDiv(blocks, nd.BlockSize)); err != nil {
		return nil, fail("%v (%d blocks in nested blocks of %d)", err, blocks, nd.BlockSize)
	}
	mapValues, err := float32s(nestedMap, 256)
	if err != nil {
		return nil, fail("%v", err)
	}
	copy(nd.Map[:], mapValues)
	q.Nested = nd
	return q, q.Validate()
}

// float32s decodes an F32 tensor of exactly n values.
func float32s(t *safetensors.Tensor, n int) ([]float32, error) {
	if t.DType != safetensors.F32 {
		return nil, fmt.Errorf("%s is %s, want F32", t.Name, t.DType)
	}
	if len(t.Data) != 4*n {
		return nil, fmt.Errorf("%s holds %d values, want %d", t.Name, len(t.Data)/4, n)
	}
	out := make([]float32, n)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
	}
	return out, nil
}

// QuantizeFile quantizes, with opts, every tensor of f that is F32, 2-D and named *.weight, and
// returns them in the layout Tensors documents, with every other tensor of f unchanged (sorted by
// name). Everything is computed before anything is returned: an error leaves nothing half done.
func QuantizeFile(f *safetensors.File, opts Options) ([]safetensors.Tensor, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	var out []safetensors.Tensor
	for i := range f.Tensors {
		t := &f.Tensors[i]
		if t.DType != safetensors.F32 || len(t.Shape) != 2 || !strings.HasSuffix(t.Name, ".weight") {
			out = append(out, *t)
			continue
		}
		values, err := t.Float32s()
		if err != nil {
			return nil, fmt.Errorf("bnb: %s: %w", t.Name, err)
		}
		q, err := Quantize(values, t.Shape, opts)
		if err != nil {
			return nil, fmt.Errorf("bnb: %s: %w", t.Name, err)
		}
		parts, err := q.Tensors(t.Name)
		if err != nil {
			return nil, err
		}
		out = append(out, parts...)
	}
	sort.SliceStable(out, func(a, b int) bool { return out[a].Name < out[b].Name })
	for i := 1; i < len(out); i++ {
		if out[i].Name == out[i-1].Name {
			return nil, fmt.Errorf("bnb: two tensors would be named %s (does the file already hold 4-bit companions?)", out[i].Name)
		}
	}
	return out, nil
}

// ReadFile reads every 4-bit weight of f (QuantizedNames) with FromTensors, and returns them by
// name together with f's other tensors (neither 4-bit weights nor their companion tensors), in
// file order. A companion tensor (X.absmax, X.quant_map, …) without its X.quant_state is an error.
func ReadFile(f *safetensors.File) (quantized map[string]*Quantized, others []safetensors.Tensor, err error) {
	quantized = map[string]*Quantized{}
	names := QuantizedNames(f)
	beside := make(map[string][]*safetensors.Tensor, len(names))
	for _, name := range names {
		beside[name] = nil
	}
	// Each tensor goes to the weight whose name is a prefix of its own up to a dot: one pass
	// over the names, however many weights (a scan per weight was quadratic).
	for i := range f.Tensors {
		t := &f.Tensors[i]
		for at := strings.IndexByte(t.Name, '.'); at > 0; {
			if _, ok := beside[t.Name[:at]]; ok {
				beside[t.Name[:at]] = append(beside[t.Name[:at]], t)
			}
			next := strings.IndexByte(t.Name[at+1:], '.')
			if next < 0 {
				break
			}
			at += 1 + next
		}
	}
	for _, name := range names {
		if quantized[name], err = fromTensors(f, name, beside[name]); err != nil {
			return nil, nil, err
		}
	}
	for _, t := range f.Tensors {
		if _, ok := quantized[t.Name]; ok {
			continue
		}
		companion := false
		for _, suffix := range []string{SuffixAbsmax, SuffixQuantMap, SuffixNestedAbsmax, SuffixNestedQuantMap} {
			if base, ok := strings.CutSuffix(t.Name, suffix); ok {
				if _, isQ := quantized[base]; !isQ {
					return nil, nil, fmt.Errorf("bnb: %s has no %s%s<type> beside it: a 4-bit weight without its quant state", t.Name, base, SuffixQuantState)
				}
				companion = true
			}
		}
		if i := strings.LastIndex(t.Name, SuffixQuantState); i > 0 {
			companion = true
		}
		if !companion {
			others = append(others, t)
		}
	}
	return quantized, others, nil
}

// DequantizeFile returns f's tensors with every 4-bit weight replaced by its dequantized F32
// values (shape from its quant state) and its companion tensors dropped; other tensors are
// returned unchanged. Errors are those of ReadFile.
func DequantizeFile(f *safetensors.File) ([]safetensors.Tensor, error) {
	quantized, out, err := ReadFile(f)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(quantized))
	for name := range quantized {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		q := quantized[name]
		out = append(out, safetensors.FromFloat32(name, q.Shape, q.Dequantize()))
	}
	return out, nil
}
