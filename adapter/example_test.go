package adapter_test

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/adapter"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
)

// Pfeiffer adapters (one bottleneck after each feed-forward sub-block) on the tiny Llama
// classifier, training the new "score" head with them. With hidden size 32 and reduction 16 the
// bottleneck is 2 wide: each adapter has 2·32·2 + 2 + 32 = 162 parameters, two layers make 324,
// and the head adds 32·2 = 64.
func Example() {
	b, err := backend.Get()
	if err != nil {
		panic(err)
	}
	cfg := llama.Tiny()
	ctx := context.New()
	if err := llama.Init(ctx, cfg, 2, 1); err != nil {
		panic(err)
	}
	acfg := adapter.Pfeiffer()
	acfg.ModulesToSave = []string{"score"}
	method, err := adapter.New(acfg)
	if err != nil {
		panic(err)
	}
	m, err := peft.NewModel(b, ctx, llama.Classifier(cfg, 2), method, shapes.Make(dtypes.Int32, 1, 8))
	if err != nil {
		panic(err)
	}
	fmt.Println(method.Sites())
	fmt.Println("bottleneck:", method.Bottleneck("model.layers.0.mlp"))
	fmt.Println(m.Report())
	fmt.Println(m.Merge())
	// Output:
	// [model.layers.0.mlp model.layers.1.mlp]
	// bottleneck: 2
	// trainable params: 388 || all params: 21,028 || trainable%: 1.8452
	// peft: method adapter cannot be merged into the base weights
}
