package prefixtuning_test

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/prefixtuning"
)

// Prefix tuning of a Llama language model with PEFT's reparameterization: 10 prefix positions in
// each of the 2 attention layers, computed from a [10, 16] embedding by a two-layer MLP.
// token_dim is 16, the 2 key/value heads of width 8 (the tiny model has 4 query heads: PEFT's
// grouped-query rewrite), so the prefix is [10, 2·2·16]. Only the embedding and the MLP train.
func Example() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	cfg := llama.Tiny()
	ctx := context.New()
	if err := llama.Init(ctx, cfg, 0, 1); err != nil {
		panic(err)
	}
	ptCfg := prefixtuning.DefaultConfig()
	ptCfg.NumVirtualTokens = 10
	ptCfg.PrefixProjection = true
	method, err := prefixtuning.New(ptCfg)
	if err != nil {
		panic(err)
	}
	model, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 4, 16))
	if err != nil {
		panic(err)
	}
	for _, tv := range model.TrainableVariables() {
		fmt.Println(tv.Variable.ScopeAndName(), tv.Variable.Shape())
	}
	prefix, err := method.PrefixValues()
	if err != nil {
		panic(err)
	}
	fmt.Println("prefix values:", len(prefix), "= 10 ×", 2*2*method.TokenDim())
	fmt.Println(model.Report())
	// Output:
	// /prefix_tuning/embedding (Float32)[10 16]
	// /prefix_tuning/transform/0/dense/weights (Float32)[16 16]
	// /prefix_tuning/transform/0/dense/biases (Float32)[16]
	// /prefix_tuning/transform/2/dense/weights (Float32)[16 64]
	// /prefix_tuning/transform/2/dense/biases (Float32)[64]
	// prefix values: 640 = 10 × 64
	// trainable params: 1,520 || all params: 24,208 || trainable%: 6.2789
}
