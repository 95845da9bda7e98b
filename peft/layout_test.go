package peft_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/pefttest"
)

func TestScopeToPath(t *testing.T) {
	for scope, want := range map[string]string{
		"/model/layers/0/mlp":                 "model.layers.0.mlp",
		"/score":                              "score",
		"/":                                   "",
		"":                                    "",
		"model/norm":                          "model.norm",
		"/model/layers/1/self_attn/q_proj":    "model.layers.1.self_attn.q_proj",
		"/transformer/h/11/attn/c_attn/dense": "transformer.h.11.attn.c_attn.dense",
	} {
		require.Equal(t, want, peft.ScopeToPath(scope), scope)
	}
}

func TestLayerIndex(t *testing.T) {
	for path, want := range map[string]int{
		"model.layers.3.mlp":                3,
		"/model/layers/12/self_attn/q_proj": 12,
		"model.layers.0":                    0,
		"transformer.h.7.attn.c_attn":       7,
		"model.layers.2.experts.5.w1":       2, // the first number
		"model.norm":                        -1,
		"score":                             -1,
		"":                                  -1,
		"model.layer3.mlp":                  -1, // not an all-digits element
		"model.layers.-1.mlp":               -1,
	} {
		require.Equal(t, want, peft.LayerIndex(path), path)
	}
}

// The layout traced from the tiny Llama classifier: what every method sees in Init.
func TestTracedLayout(t *testing.T) {
	m := pefttest.NewModel(t, nil)
	layout := m.Layout()
	cfg := pefttest.Config()
	require.Equal(t, 2, layout.NumLayers)
	require.True(t, layout.HasInputs)
	require.Equal(t, cfg.HiddenSize, layout.InputDim)
	require.Equal(t, cfg.MaxPositions, layout.MaxLength)
	require.Equal(t, pefttest.Seq, layout.SeqLength)

	require.Len(t, layout.Linears, 15, "7 per block and the score head")
	require.Equal(t, []string{
		"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
		"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
		"model.layers.0.mlp.down_proj",
	}, layout.LinearPaths()[:7])
	k := layout.Linear("model.layers.1.self_attn.k_proj")
	require.NotNil(t, k)
	require.Equal(t, peft.LinearLayer{Path: "model.layers.1.self_attn.k_proj", Scope: "/model/layers/1/self_attn/k_proj",
		In: 32, Out: 16, Layer: 1}, *k)
	require.Equal(t, "/model/layers/1/self_attn/k_proj/dense", k.WeightsScope())
	require.Same(t, m.Context().GetVariableByScopeAndName(k.WeightsScope(), "weights"), k.Weights(m.Context()))
	require.Nil(t, k.Biases(m.Context()))
	score := layout.Linear("score")
	require.Equal(t, peft.LinearLayer{Path: "score", Scope: "/score", In: 32, Out: 2, Head: true, Layer: -1}, *score)
	require.Nil(t, layout.Linear("lm_head"))

	require.Len(t, layout.SubBlocks, 4)
	for i, want := range []peft.SubBlockSite{
		{Path: "model.layers.0.self_attn", Scope: "/model/layers/0/self_attn", Kind: peft.Attention, Layer: 0, Dim: 32},
		{Path: "model.layers.0.mlp", Scope: "/model/layers/0/mlp", Kind: peft.FeedForward, Layer: 0, Dim: 32},
		{Path: "model.layers.1.self_attn", Scope: "/model/layers/1/self_attn", Kind: peft.Attention, Layer: 1, Dim: 32},
		{Path: "model.layers.1.mlp", Scope: "/model/layers/1/mlp", Kind: peft.FeedForward, Layer: 1, Dim: 32},
	} {
		require.Equal(t, want, *layout.SubBlocks[i])
	}
	require.Len(t, layout.Embeddings, 1)
	require.Equal(t, peft.EmbeddingSite{Path: "model.embed_tokens", Scope: "/model/embed_tokens", Vocab: 64, Dim: 32}, *layout.Embeddings[0])
	require.Equal(t, []int{64, 32}, layout.Embeddings[0].Table(m.Context()).Shape().Dimensions)

	// 1 embedding table, 9 variables per block (2 norms, 7 projections), the final norm, the head.
	require.Len(t, layout.BaseVariables, 1+2*9+1+1)
}

func TestLayoutDepth(t *testing.T) {
	m := pefttest.NewModel(t, nil)
	layout := m.Layout()
	want := map[string]int{
		"/model/embed_tokens/embeddings":                  0,
		"/model/layers/0/input_layernorm/weight":          1,
		"/model/layers/0/self_attn/q_proj/dense/weights":  1,
		"/model/layers/0/mlp/down_proj/dense/weights":     1,
		"/model/layers/1/post_attention_layernorm/weight": 2,
		"/model/layers/1/mlp/up_proj/dense/weights":       2,
		"/model/norm/weight":                              2, // after the blocks: NumLayers
		"/score/dense/weights":                            2,
	}
	seen := 0
	for _, v := range layout.BaseVariables {
		depth := layout.Depth(v)
		require.GreaterOrEqual(t, depth, 0)
		require.LessOrEqual(t, depth, layout.NumLayers)
		if d, ok := want[v.ScopeAndName()]; ok {
			require.Equal(t, d, depth, v.ScopeAndName())
			seen++
		}
	}
	require.Equal(t, len(want), seen, "every listed variable exists")
}

// Depth on a hand-built layout: variables before the first block are at depth 0, after the
// last at NumLayers, whatever their names.
func TestLayoutDepthByHand(t *testing.T) {
	_, layout := handVariables()
	got := map[string]int{}
	for _, v := range layout.BaseVariables {
		got[v.ScopeAndName()] = layout.Depth(v)
	}
	require.Equal(t, map[string]int{
		"/model/embed_tokens/embeddings":                 0,
		"/model/layers/0/input_layernorm/weight":         1,
		"/model/layers/0/self_attn/q_proj/dense/weights": 1,
		"/model/layers/1/input_layernorm/weight":         2,
		"/model/layers/1/self_attn/q_proj/dense/weights": 2,
		"/model/norm/weight":                             2,
		"/score/dense/weights":                           2,
		"/score/dense/biases":                            2,
	}, got)
}
