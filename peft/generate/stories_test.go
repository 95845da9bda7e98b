package generate_test

import (
	"encoding/json"
	"io/fs"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/stories260k"
)

// Greedy decoding from <s> on the real stories260K model gives golden.json's 64 ids exactly.
func TestStories260KGoldenGreedy(t *testing.T) {
	data, err := fs.ReadFile(stories260k.FS(), "golden.json")
	require.NoError(t, err)
	var g struct {
		Greedy struct {
			StartIDs     []int `json:"start_ids"`
			GeneratedIDs []int `json:"generated_ids"`
		} `json:"greedy"`
	}
	require.NoError(t, json.Unmarshal(data, &g))
	require.Len(t, g.Greedy.GeneratedIDs, 64)

	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	require.NoError(t, err)
	b, err := backend.Get()
	require.NoError(t, err)
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), nil, shapes.Make(dtypes.Int32, 1, 2))
	require.NoError(t, err)
	ids, err := generate.Generate(m, g.Greedy.StartIDs, generate.Config{MaxNewTokens: 64})
	require.NoError(t, err)
	require.Equal(t, g.Greedy.GeneratedIDs, ids)

	// MeanNLL over the golden sequence is golden.json's mean cross-entropy.
	nll, err := generate.MeanNLL(m, append(append([]int{}, g.Greedy.StartIDs...), ids...))
	require.NoError(t, err)
	require.InDelta(t, 0.39728868731037015, nll, 1e-4)
	nll, err = generate.MeanNLL(m, []int{1})
	require.NoError(t, err)
	require.Zero(t, nll)
	_, err = generate.MeanNLL(m, []int{1, 9999})
	require.ErrorContains(t, err, "outside the vocabulary")
}
