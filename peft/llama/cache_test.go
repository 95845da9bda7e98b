package llama_test

import (
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/peft/llama"
	"peft/peft/pefttest"
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
	require.ErrorContains(t, err, "want 4 inputs")
	_, err = m.CallFn("prefill/65", llama.CausalLMPrefill(cfg, cfg.MaxPositions+1), ids)
	require.ErrorContains(t, err, "exceeds max_position_embeddings 64")
}
