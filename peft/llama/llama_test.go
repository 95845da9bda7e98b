package llama_test

import (
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/peft/llama"
	"peft/peft/pefttest"
)

func TestCausalLMShapesAndCausality(t *testing.T) {
	cfg := llama.Tiny()
	m := pefttest.NewLlama(t, cfg, 0, nil, 2, 5)
	require.Len(t, m.Layout().Linears, 7*cfg.NumLayers+1)
	require.Len(t, m.Layout().SubBlocks, 2*cfg.NumLayers)
	require.Equal(t, cfg.NumLayers, m.Layout().NumLayers)

	ids := [][]int32{{1, 5, 9, 3, 7}, {2, 4, 6, 8, 10}}
	out, err := m.Call(tensors.FromValue(ids))
	require.NoError(t, err)
	require.Equal(t, []int{2, 5, cfg.VocabSize}, out[0].Shape().Dimensions)
	before := out[0].Value().([][][]float32)

	// Changing the last token must not change the logits of earlier positions.
	ids[0][4] = 11
	out, err = m.Call(tensors.FromValue(ids))
	require.NoError(t, err)
	after := out[0].Value().([][][]float32)
	for pos := 0; pos < 4; pos++ {
		require.Equal(t, before[0][pos], after[0][pos], "position %d changed", pos)
	}
	require.NotEqual(t, before[0][4], after[0][4])
}
