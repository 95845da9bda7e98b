package bnb_test

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/bnb"
	"peft/peft/safetensors"
)

// encodeParse writes tensors as a safetensors file and parses it back, as a checkpoint would be.
func encodeParse(t *testing.T, ts []safetensors.Tensor) *safetensors.File {
	t.Helper()
	data, err := safetensors.Encode(ts, map[string]string{"format": "pt"})
	require.NoError(t, err)
	f, err := safetensors.Parse(data)
	require.NoError(t, err)
	return f
}

// The tensors of a 4-bit weight have the names, dtypes and shapes of bitsandbytes' Linear4bit
// state dict, and the quant state is Python's json.dumps of the non-tensor fields, in order.
func TestTensorsLayout(t *testing.T) {
	values := peft.Normal(peft.NewRand(2), 32*64, 0.02)
	for _, tc := range []struct {
		name  string
		opts  bnb.Options
		want  map[string]string // tensor suffix → dtype and shape
		state string            // the JSON up to the offset
	}{
		{"nf4 double quant", bnb.DefaultOptions(), map[string]string{
			"": "U8[1024 1]", ".absmax": "U8[32]", ".quant_map": "F32[16]", ".nested_absmax": "F32[1]",
			".nested_quant_map": "F32[256]", ".quant_state.bitsandbytes__nf4": "U8",
		}, `{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0`},
		{"fp4 no double quant", bnb.Options{Type: bnb.FP4, BlockSize: 128}, map[string]string{
			"": "U8[1024 1]", ".absmax": "F32[16]", ".quant_map": "F32[16]", ".quant_state.bitsandbytes__fp4": "U8",
		}, `{"quant_type": "fp4", "blocksize": 128, "dtype": "float32", "shape": [32, 64]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, err := bnb.Quantize(values, []int{32, 64}, tc.opts)
			require.NoError(t, err)
			ts, err := q.Tensors("model.layers.0.mlp.up_proj.weight")
			require.NoError(t, err)
			got := map[string]string{}
			var state string
			for _, st := range ts {
				suffix := strings.TrimPrefix(st.Name, "model.layers.0.mlp.up_proj.weight")
				desc := fmt.Sprintf("%s%v", st.DType, st.Shape)
				if strings.Contains(suffix, "quant_state") {
					desc = string(st.DType)
					state = string(st.Data)
				}
				got[suffix] = desc
			}
			require.Equal(t, tc.want, got)
			require.True(t, strings.HasPrefix(state, tc.state), "quant state %s", state)
			if q.Nested != nil {
				_, offset, ok := strings.Cut(strings.TrimSuffix(state, "}"), `"nested_offset": `)
				require.True(t, ok)
				parsed, err := strconv.ParseFloat(offset, 64)
				require.NoError(t, err)
				require.Equal(t, q.Nested.Offset, float32(parsed))
			}

			// Round trip through a safetensors file.
			f := encodeParse(t, ts)
			back, err := bnb.FromTensors(f, "model.layers.0.mlp.up_proj.weight")
			require.NoError(t, err)
			require.Equal(t, q, back)
			require.Equal(t, q.Dequantize(), back.Dequantize())
			require.Equal(t, []string{"model.layers.0.mlp.up_proj.weight"}, bnb.QuantizedNames(f))
		})
	}
}

// Every way a checkpoint's quant state can disagree with its tensors is an error naming the
// weight.
func TestFromTensorsRejectsInconsistentCheckpoints(t *testing.T) {
	const name = "w.weight"
	values := peft.Normal(peft.NewRand(4), 16*64, 0.02)
	q, err := bnb.Quantize(values, []int{16, 64}, bnb.DefaultOptions())
	require.NoError(t, err)
	good, err := q.Tensors(name)
	require.NoError(t, err)
	const stateName = name + ".quant_state.bitsandbytes__nf4"
	replace := func(ts []safetensors.Tensor, tname string, fn func(*safetensors.Tensor)) []safetensors.Tensor {
		out := slices.Clone(ts)
		for i := range out {
			if out[i].Name == tname {
				out[i].Data = slices.Clone(out[i].Data)
				fn(&out[i])
			}
		}
		return out
	}
	remove := func(ts []safetensors.Tensor, tname string) []safetensors.Tensor {
		return slices.DeleteFunc(slices.Clone(ts), func(t safetensors.Tensor) bool { return t.Name == tname })
	}
	setState := func(json string) func(*safetensors.Tensor) {
		return func(t *safetensors.Tensor) { t.Data = []byte(json); t.Shape = []int{len(json)} }
	}
	state := func(shape string, more string) string {
		return `{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": ` + shape +
			`, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.01` + more + `}`
	}
	for _, tc := range []struct {
		name   string
		tensor []safetensors.Tensor
		want   string
	}{
		{"shape disagrees with packed bytes", replace(good, stateName, setState(state("[32, 64]", ""))), "packed weight has 512 bytes, the quant state's shape [32 64] needs 1024"},
		{"block size not a power of two", replace(good, stateName, setState(strings.Replace(state("[16, 64]", ""), `"blocksize": 64`, `"blocksize": 48`, 1))), "blocksize must be a power of two"},
		{"block size disagrees with absmax", replace(good, stateName, setState(strings.Replace(state("[16, 64]", ""), `"blocksize": 64`, `"blocksize": 32`, 1))), "double quantization of 32 blocks needs U8[32]"},
		{"type differs from key", replace(good, stateName, setState(strings.Replace(state("[16, 64]", ""), `"nf4"`, `"fp4"`, 1))), `quant state says quant_type "fp4" but its key says "nf4"`},
		{"unknown type key", append(remove(good, stateName), safetensors.FromUint8(name+".quant_state.bitsandbytes__int4", []int{2}, []byte("{}"))), `unknown quant type "int4"`},
		{"not JSON", replace(good, stateName, setState("{nope")), "is not the JSON quant state"},
		{"unknown field", replace(good, stateName, setState(state("[16, 64]", `, "extra": 1`))), `unknown field "extra"`},
		{"bad dtype", replace(good, stateName, setState(strings.Replace(state("[16, 64]", ""), `"float32"`, `"int8"`, 1))), `dtype "int8"`},
		{"negative shape", replace(good, stateName, setState(state("[-16, 64]", ""))), "not a valid shape"},
		{"missing packed weight", remove(good, name), "packed weight tensor is missing"},
		{"packed weight not U8", replace(good, name, func(t *safetensors.Tensor) { t.DType = safetensors.I8 }), "packed weight is I8, want U8"},
		{"missing absmax", remove(good, name+".absmax"), ".absmax is missing"},
		{"missing quant map", remove(good, name+".quant_map"), ".quant_map is missing"},
		{"wrong quant map", replace(good, name+".quant_map", func(t *safetensors.Tensor) { t.Data[0] ^= 1 }), "quant_map[0] is"},
		{"nested absmax missing", remove(good, name+".nested_absmax"), "double quantization is incomplete"},
		{"nested map missing", remove(good, name+".nested_quant_map"), "double quantization is incomplete"},
		{"nested absmax wrong count", replace(good, name+".nested_absmax", func(t *safetensors.Tensor) {
			t.Data = append(t.Data, 0, 0, 0, 0)
			t.Shape = []int{2}
		}), "nested_absmax holds 2 values, want 1"},
		{"nested block size", replace(good, stateName, setState(strings.Replace(state("[16, 64]", ""), `"nested_blocksize": 256`, `"nested_blocksize": 100`, 1))), "nested_blocksize must be a power of two"},
		{"stray companion", append(slices.Clone(good), safetensors.FromFloat32(name+".scales", []int{1}, []float32{1})), "unexpected tensor w.weight.scales"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := encodeParse(t, tc.tensor)
			_, err := bnb.FromTensors(f, name)
			require.ErrorContains(t, err, tc.want)
			require.ErrorContains(t, err, name)
		})
	}
	// A companion tensor without its quant state is refused by ReadFile.
	f := encodeParse(t, remove(good, stateName))
	_, _, err = bnb.ReadFile(f)
	require.ErrorContains(t, err, "a 4-bit weight without its quant state")
}

// QuantizeFile quantizes exactly the 2-D F32 *.weight tensors, copies the rest, and
// DequantizeFile restores them with the host dequantization.
func TestQuantizeFileRoundTrip(t *testing.T) {
	w := peft.Normal(peft.NewRand(6), 8*64, 0.02)
	in := encodeParse(t, []safetensors.Tensor{
		safetensors.FromFloat32("a.weight", []int{8, 64}, w),
		safetensors.FromFloat32("norm.weight", []int{64}, w[:64]),
		safetensors.FromFloat32("a.bias", []int{8, 64}, w),
		{Name: "half.weight", DType: safetensors.F16, Shape: []int{2, 2}, Data: make([]byte, 8)},
	})
	out, err := bnb.QuantizeFile(in, bnb.DefaultOptions())
	require.NoError(t, err)
	var names []string
	for _, t := range out {
		names = append(names, t.Name)
	}
	require.Equal(t, []string{"a.bias", "a.weight", "a.weight.absmax", "a.weight.nested_absmax", "a.weight.nested_quant_map",
		"a.weight.quant_map", "a.weight.quant_state.bitsandbytes__nf4", "half.weight", "norm.weight"}, names)
	f := encodeParse(t, out)
	back, err := bnb.DequantizeFile(f)
	require.NoError(t, err)
	q, err := bnb.Quantize(w, []int{8, 64}, bnb.DefaultOptions())
	require.NoError(t, err)
	byName := map[string]safetensors.Tensor{}
	for _, t := range back {
		byName[t.Name] = t
	}
	require.Len(t, byName, 4)
	aw := byName["a.weight"]
	got, err := aw.Float32s()
	require.NoError(t, err)
	require.Equal(t, q.Dequantize(), got)
	require.Equal(t, []int{8, 64}, byName["a.weight"].Shape)
	require.Equal(t, in.Tensors[1].Data, byName["a.bias"].Data)

	// Quantizing a file that already holds a 4-bit weight's companions collides: an error.
	_, err = bnb.QuantizeFile(encodeParse(t, append(out, safetensors.FromFloat32("b.weight", []int{1, 2}, []float32{1, 2}),
		safetensors.FromFloat32("b.weight.absmax", []int{1}, []float32{1}))), bnb.DefaultOptions())
	require.ErrorContains(t, err, "two tensors would be named b.weight.absmax")
	_, err = bnb.QuantizeFile(in, bnb.Options{Type: bnb.NF4, BlockSize: 100})
	require.ErrorContains(t, err, "got 100")
	require.False(t, math.IsNaN(float64(got[0])))
}

// BenchmarkReadFile reads a file of many small 4-bit weights (a quantized model has hundreds):
// the time per weight must not grow with their number.
//
//	go test -run '^$' -bench ReadFile ./peft/bnb/
func BenchmarkReadFile(b *testing.B) {
	for _, n := range []int{256, 4096} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			opts := bnb.Options{Type: bnb.NF4, BlockSize: 64, DoubleQuant: true}
			var tensors []safetensors.Tensor
			for i := range n {
				q, err := bnb.Quantize(make([]float32, 128), []int{2, 64}, opts)
				require.NoError(b, err)
				parts, err := q.Tensors(fmt.Sprintf("model.layers.%d.mlp.weight", i))
				require.NoError(b, err)
				tensors = append(tensors, parts...)
			}
			data, err := safetensors.Encode(tensors, nil)
			require.NoError(b, err)
			f, err := safetensors.Parse(data)
			require.NoError(b, err)
			for b.Loop() {
				quantized, _, err := bnb.ReadFile(f)
				require.NoError(b, err)
				require.Len(b, quantized, n)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/weight")
		})
	}
}
