package prompttuning_test

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/prompttuning"
)

// Prompt tuning of a Llama sequence classifier: 20 virtual tokens initialized from the text of a
// tokenized instruction, and the new "score" head trained beside them. Only 20·32 prompt values
// and the 32·2 head train; everything else stays frozen.
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

	ptCfg := prompttuning.DefaultConfig()
	ptCfg.Init = prompttuning.InitText
	ptCfg.InitTokenIDs = []int{5, 17, 42, 8} // e.g. "Classify the sentiment:", repeated to 20 tokens
	ptCfg.ModulesToSave = []string{"score"}
	method, err := prompttuning.New(ptCfg)
	if err != nil {
		panic(err)
	}
	model, err := peft.NewModel(b, ctx, llama.Classifier(cfg, 2), method, shapes.Make(dtypes.Int32, 8, 16))
	if err != nil {
		panic(err)
	}
	prompt := method.PromptEmbeddings()
	fmt.Println(prompt.ScopeAndName(), prompt.Shape())
	fmt.Println(model.Report())
	// Output:
	// /prompt_tuning/prompt_embeddings (Float32)[20 32]
	// trainable params: 704 || all params: 21,344 || trainable%: 3.2984
}
