package llama_test

import (
	"fmt"
	"math"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/prefixtuning"
	"peft/prompttuning"
)

// The cached functions' shapes, and their errors through peft.Model.CallFn: the prefill returns
// logits for its ids and a cache with room for maxLen tokens; a step takes the cache back and
// returns it shaped alike; ids longer than the room, a cache of another shape, a non-scalar start
// and a cache beyond max_position_embeddings are errors naming the problem. (peft/generate's
// tests check the values against CausalLM.)
func TestCachedDecodingShapesAndErrors(t *testing.T) {
	cfg := llama.Tiny()
	m := pefttest.NewLlama(t, cfg, 0, nil, 2, 4)
	ids := tensors.FromValue([][]int32{{1, 2, 3}, {4, 5, 6}})
	out, err := m.CallFn("prefill/8", llama.CausalLMPrefill(cfg, 8), ids)
	require.NoError(t, err)
	require.Len(t, out, 3)
	cache := []int{cfg.NumLayers, 2, 8, cfg.NumKVHeads, cfg.HeadDim()}
	require.Equal(t, []int{2, 3, cfg.VocabSize}, out[0].Shape().Dimensions)
	require.Equal(t, cache, out[1].Shape().Dimensions)
	require.Equal(t, cache, out[2].Shape().Dimensions)
	keys, values := out[1], out[2]

	next := tensors.FromValue([][]int32{{7}, {8}})
	out, err = m.CallFn("step", llama.CausalLMStep(cfg), next, tensors.FromScalar(int32(3)), keys, values)
	require.NoError(t, err)
	require.Equal(t, []int{2, 1, cfg.VocabSize}, out[0].Shape().Dimensions)
	require.Equal(t, cache, out[1].Shape().Dimensions)

	_, err = m.CallFn("prefill/2", llama.CausalLMPrefill(cfg, 2), ids)
	require.ErrorContains(t, err, "3 token ids do not fit a cache of 2")
	_, err = m.CallFn("step", llama.CausalLMStep(cfg), tensors.FromValue([][]int32{{7}}), tensors.FromScalar(int32(3)), keys, values)
	require.ErrorContains(t, err, "[layers, batch, length, kvHeads, headDim]")
	_, err = m.CallFn("step", llama.CausalLMStep(cfg), next, tensors.FromValue([]int32{3}), keys, values)
	require.ErrorContains(t, err, "start must be an integer scalar")
	_, err = m.CallFn("step3", llama.CausalLMStep(cfg), next, tensors.FromScalar(int32(3)), keys)
	require.ErrorContains(t, err, "want 4 or 5 inputs")
	_, err = m.CallFn("prefill/65", llama.CausalLMPrefill(cfg, cfg.MaxPositions+1), ids)
	require.ErrorContains(t, err, "exceeds max_position_embeddings 64")
	_, err = m.CallFn("prefill/8/pad", llama.CausalLMPrefill(cfg, 8), ids, tensors.FromValue([]int32{0, 1, 2}))
	require.ErrorContains(t, err, "pad must be integers [batch=2]")
	_, err = m.CallFn("step/pad", llama.CausalLMStep(cfg), next, tensors.FromScalar(int32(3)), keys, values, tensors.FromScalar(int32(0)))
	require.ErrorContains(t, err, "pad must be integers [batch=2]")
}

// A left-padded batch decodes each row as it would alone: rows of 3 and 5 ids, the first padded
// by 2, give after the prefill the logits and the whole cache of each row's own unpadded prefill
// (entries past a row's tokens untouched: zero), and after two steps the logits of each row's own
// steps, within 1e-5, on the base model and with prompt and prefix tuning (whose virtual positions
// come before each row's first real token).
func TestCachedDecodingLeftPadding(t *testing.T) {
	cfg := llama.Tiny()
	pc := prompttuning.DefaultConfig()
	pc.NumVirtualTokens = 3
	prompt, err := prompttuning.New(pc)
	require.NoError(t, err)
	xc := prefixtuning.DefaultConfig()
	xc.NumVirtualTokens = 2
	prefix, err := prefixtuning.New(xc)
	require.NoError(t, err)
	rows := [][]int32{{1, 2, 3}, {4, 5, 6, 7, 8}}
	steps := [][]int32{{9, 11}, {10, 12}} // steps[s] holds step s's id of each row
	const room, width = 8, 5
	for _, method := range []struct {
		name string
		m    peft.Method
	}{{"base", nil}, {"prompt_tuning", prompt}, {"prefix_tuning", prefix}} {
		t.Run(method.name, func(t *testing.T) {
			m := pefttest.NewLlama(t, cfg, 0, method.m, 2, width)
			worst := 0.0
			near := func(want, got [][]float32) {
				t.Helper()
				require.Len(t, got, len(want))
				for i := range want {
					for j := range want[i] {
						worst = math.Max(worst, math.Abs(float64(want[i][j]-got[i][j])))
					}
				}
			}
			pad := tensors.FromValue([]int32{2, 0})
			out, err := m.CallFn("pad/prefill", llama.CausalLMPrefill(cfg, room), tensors.FromValue([][]int32{{0, 0, 1, 2, 3}, rows[1]}), pad)
			require.NoError(t, err)
			logits := out[0].Value().([][][]float32)
			keys, values := out[1], out[2]
			batchKeys, batchValues := keys.Value().([][][][][]float32), values.Value().([][][][][]float32)
			alone := make([][][][]float32, len(rows)) // alone[b][s]: row b's logits [1, vocab] at step s
			for b, ids := range rows {
				first, err := m.CallFn(fmt.Sprintf("alone/prefill/%d", len(ids)), llama.CausalLMPrefill(cfg, room), tensors.FromValue([][]int32{ids}))
				require.NoError(t, err)
				near(first[0].Value().([][][]float32)[0], logits[b][width-len(ids):])
				aloneKeys, aloneValues := first[1].Value().([][][][][]float32), first[2].Value().([][][][][]float32)
				for l := range cfg.NumLayers {
					for e := range aloneKeys[l][0] {
						near(aloneKeys[l][0][e], batchKeys[l][b][e])
						near(aloneValues[l][0][e], batchValues[l][b][e])
					}
				}
				k, v := first[1], first[2]
				for s := range steps {
					out, err := m.CallFn("alone/step", llama.CausalLMStep(cfg), tensors.FromValue([][]int32{{steps[s][b]}}),
						tensors.FromScalar(int32(len(ids)+s)), k, v)
					require.NoError(t, err)
					alone[b] = append(alone[b], out[0].Value().([][][]float32)[0])
					k, v = out[1], out[2]
				}
			}
			for s := range steps {
				out, err := m.CallFn("pad/step", llama.CausalLMStep(cfg), tensors.FromValue([][]int32{{steps[s][0]}, {steps[s][1]}}),
					tensors.FromScalar(int32(width+s)), keys, values, pad)
				require.NoError(t, err)
				for b := range rows {
					near(alone[b][s], out[0].Value().([][][]float32)[b])
				}
				keys, values = out[1], out[2]
			}
			t.Logf("max |padded − alone| %.3g", worst)
			require.Less(t, worst, 1e-5)
		})
	}
}
