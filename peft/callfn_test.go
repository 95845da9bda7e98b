package peft_test

import (
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft/llama"
	"peft/peft/pefttest"
)

// CallFn runs another function over the model's variables with the method active: the model's
// own function under a key gives Call's logits exactly (with a LoRA update that changes them),
// the executor of a key is reused (another function under a used key runs the first), Merge
// drops it (the merged model still agrees), and bad arguments or a panicking function are errors.
func TestCallFn(t *testing.T) {
	cfg := llama.Tiny()
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	m := pefttest.NewLlama(t, cfg, 0, method, 1, 6)
	pefttest.SetRandomB(t, m, 3, 0.5)
	base := pefttest.NewLlama(t, cfg, 0, nil, 1, 6)
	ids := [][]int32{{1, 9, 4, 33, 2, 60}}
	want := pefttest.Call(t, m, ids, nil).Value()
	require.NotEqual(t, pefttest.Call(t, base, ids, nil).Value(), want, "the LoRA update must change the logits")

	out, err := m.CallFn("causal", llama.CausalLM(cfg), tensors.FromValue(ids))
	require.NoError(t, err)
	require.Equal(t, want, out[0].Value())

	doubled := func(ctx *context.Context, spec any, inputs []*graph.Node) []*graph.Node {
		logits := llama.CausalLM(cfg)(ctx, spec, inputs)[0]
		return []*graph.Node{graph.MulScalar(logits, 2)}
	}
	out, err = m.CallFn("causal", doubled, tensors.FromValue(ids))
	require.NoError(t, err)
	require.Equal(t, want, out[0].Value(), "a used key runs the function compiled first")
	out, err = m.CallFn("doubled", doubled, tensors.FromValue(ids))
	require.NoError(t, err)
	twice := out[0].Value().([][][]float32)
	for i, row := range want.([][][]float32)[0] {
		for v, x := range row {
			require.Equal(t, 2*x, twice[0][i][v])
		}
	}

	require.NoError(t, m.Merge())
	merged := pefttest.Call(t, m, ids, nil).Value()
	out, err = m.CallFn("causal", llama.CausalLM(cfg), tensors.FromValue(ids))
	require.NoError(t, err)
	require.Equal(t, merged, out[0].Value(), "after Merge the executor is rebuilt on the merged weights")
	require.NoError(t, m.Unmerge())

	_, err = m.CallFn("", llama.CausalLM(cfg), tensors.FromValue(ids))
	require.ErrorContains(t, err, "give a key")
	_, err = m.CallFn("causal", nil, tensors.FromValue(ids))
	require.ErrorContains(t, err, "give a key, a function")
	_, err = m.CallFn("panics", func(*context.Context, any, []*graph.Node) []*graph.Node { panic("no such model") }, tensors.FromValue(ids))
	require.ErrorContains(t, err, "no such model")
	require.ErrorContains(t, err, "peft.Model.CallFn panics")
}
