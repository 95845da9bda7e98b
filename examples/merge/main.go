// Command merge folds a saved adapter of a method that merges (LoRA, DoRA, AdaLoRA, IA³, QLoRA
// and QDoRA, whose 4-bit base is written dequantized to float32; a Hugging Face PEFT folder,
// written by this SDK or by PEFT) into its base model and writes the result as a standard
// Hugging Face folder (config.json, model.safetensors with Hugging Face names and [out, in]
// layout, tokenizer files copied), which this SDK and Hugging Face transformers load like any
// checkpoint, with no adapter left to apply at inference. Adapters, prompt and prefix tuning add
// computation that no weight can hold: run them unmerged (examples/generate -adapter).
//
// -out must be a new or empty folder, none of the inputs: merge never writes over an adapter or
// a model.
//
// With -combine it does adapter arithmetic instead (package peft/lora/combine, Hugging Face
// PEFT's add_weighted_adapter): it combines several LoRA adapters of one base model into a new
// LoRA adapter folder, which loads like any adapter (and merges into the base with a second run).
//
//	go run ./examples/merge -adapter my-lora -out merged            # base: the embedded stories260K
//	go run ./examples/merge -model DIR -adapter my-lora -out merged
//	go run ./examples/merge -combine cat -adapter a,b -weights 0.7,0.3 -out mixed
//	go run ./examples/merge -combine ties -adapter a -adapter b -density 0.5 -out mixed
//
// Combination flags (all but -combine need it): -combine TYPE (linear, cat, svd, ties, ties_svd,
// dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd),
// -adapter DIR repeated or as a comma list, -weights (one per adapter, default 1 each), -density
// (the pruning types), -svd-rank and -svd-clamp (the svd types), -majority-sign total|frequency
// (the TIES types), -seed (DARE's random pruning).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/lora/combine"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/stories260k"
)

func main() {
	err := cli(os.Args[1:])
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, errUsage):
		fmt.Fprintln(os.Stderr, "merge:", err)
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "merge:", err)
		os.Exit(1)
	}
}

// errUsage marks command-line mistakes (exit status 2).
var errUsage = errors.New("usage")

// listFlag collects a flag given several times, each time one value or a comma list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item == "" {
			return errors.New("empty item in the list")
		}
		*l = append(*l, item)
	}
	return nil
}

// combineFlags are the flags used by -combine alone.
var combineFlags = []string{"weights", "density", "svd-rank", "svd-clamp", "majority-sign", "seed"}

// cli parses the command line and runs the merge or the combination.
func cli(args []string) error {
	flags := flag.NewFlagSet("merge", flag.ContinueOnError)
	modelDir := flags.String("model", "", "base model: a Hugging Face Llama folder (default: the embedded stories260K); not used with -combine")
	var adapters listFlag
	flags.Var(&adapters, "adapter", "saved adapter to merge into the base (LoRA, DoRA, AdaLoRA, IA³, QLoRA: a Hugging Face PEFT folder from this SDK or from PEFT); with -combine, the LoRA adapters to combine (repeat the flag or give a comma list)")
	out := flags.String("out", "", "new or empty folder to write to: the merged model, or with -combine the combined adapter")
	allowOtherBase := flags.Bool("allow-other-base", false, "apply the adapter even if it was saved on a base model with other weights")
	typ := flags.String("combine", "", "combine the -adapter folders into a new LoRA adapter instead of merging: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd (PEFT's combination_type)")
	var weightList listFlag
	flags.Var(&weightList, "weights", "with -combine: one weight per adapter, comma-separated; negative subtracts (default 1 each)")
	density := flags.Float64("density", 0, "with -combine ties, dare_* and magnitude_prune (and their _svd forms): fraction of entries kept, in (0, 1]")
	svdRank := flags.Int("svd-rank", 0, "with -combine *svd: rank of the new adapter (default: the largest input rank)")
	svdClamp := flags.Float64("svd-clamp", 0, "with -combine *svd: clamp the factors at this quantile of their entries, in (0, 1] (default: no clamping)")
	majority := flags.String("majority-sign", combine.SignTotal, "with -combine ties, dare_ties (and _svd): how the sign is elected, total or frequency")
	seed := flags.Uint64("seed", 0, "with -combine dare_*: seed of the random pruning (deterministic; not torch's draw)")
	flags.Usage = func() {
		fmt.Fprintf(flags.Output(), "Usage:\n  merge [-model DIR] -adapter DIR -out DIR           fold an adapter into its base model\n  merge -combine TYPE -adapter A,B [-weights 0.5,0.5] [options] -out DIR   combine LoRA adapters into a new one\n\nFlags:\n")
		flags.PrintDefaults()
	}
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err) // Parse has printed the usage
	}
	set := map[string]bool{}
	flags.Visit(func(f *flag.Flag) { set[f.Name] = true })
	usage := func(format string, a ...any) error {
		flags.Usage()
		return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, a...))
	}
	switch {
	case flags.NArg() > 0:
		return usage("unexpected arguments %q", flags.Args())
	case len(adapters) == 0 || *out == "":
		return usage("-adapter and -out are required")
	}
	if err := checkOut(*out, adapters); err != nil {
		return usage("%v", err)
	}
	if *typ == "" {
		for _, name := range combineFlags {
			if set[name] {
				return usage("-%s is used with -combine only", name)
			}
		}
		if len(adapters) > 1 {
			return usage("%d adapters given: merging folds one adapter into the base; to combine several, add -combine TYPE", len(adapters))
		}
		if *allowOtherBase {
			loadOptions = append(loadOptions, peft.AllowOtherBase())
		}
		return run(*modelDir, adapters[0], *out)
	}
	for _, name := range []string{"model", "allow-other-base"} {
		if set[name] {
			return usage("-%s is not used with -combine (combining needs no base model)", name)
		}
	}
	cfg := combine.DefaultConfig()
	cfg.Type, cfg.Density, cfg.SVDRank, cfg.SVDClamp, cfg.MajoritySign, cfg.Seed = combine.Type(*typ), *density, *svdRank, *svdClamp, *majority, *seed
	for _, w := range weightList {
		x, err := strconv.ParseFloat(w, 64)
		if err != nil {
			return usage("-weights: %q is not a number", w)
		}
		cfg.Weights = append(cfg.Weights, x)
	}
	if len(weightList) == 0 {
		for range adapters {
			cfg.Weights = append(cfg.Weights, 1)
		}
	}
	combined, err := combine.CombineDirs(*out, adapters, cfg)
	if err != nil {
		return err
	}
	fmt.Printf("combined %d adapter(s) (%s, weights %v) into %s: rank %d, %d layers, target_modules %s\n",
		len(adapters), cfg.Type, cfg.Weights, *out, combined.Rank, len(combined.Layers), combined.Targets)
	return nil
}

// checkOut refuses an -out folder that is one of the inputs or holds anything: writing there
// would replace an adapter or a model (a training run's, say) or mix the output with other files.
func checkOut(out string, inputs []string) error {
	outAbs, err := filepath.Abs(out)
	if err != nil {
		return fmt.Errorf("-out %s: %w", out, err)
	}
	for _, in := range inputs {
		if inAbs, err := filepath.Abs(in); err == nil && inAbs == outAbs {
			return fmt.Errorf("-out %s is also an -adapter: write to a new folder", out)
		}
	}
	entries, err := os.ReadDir(out)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("-out %s: %w", out, err)
	case len(entries) > 0:
		return fmt.Errorf("-out %s is not empty (it holds %s…): write to a new or empty folder; merge never writes over an adapter or a model", out, entries[0].Name())
	}
	return nil
}

// tokenizerFiles are copied from the base model's folder when present.
var tokenizerFiles = []string{"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"}

// loadOptions are passed to Model.Load (-allow-other-base).
var loadOptions []peft.LoadOption

func run(modelDir, adapterDir, out string) error {
	b, err := backend.Get()
	if err != nil {
		return err
	}
	fmt.Println(backend.Description())
	fsys, name := stories260k.FS(), stories260k.Name
	if modelDir != "" {
		fsys, name = os.DirFS(modelDir), modelDir
	}
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, fsys)
	if err != nil {
		return err
	}
	peft.NameBaseModel(ctx, name)
	method, err := methods.FromSaved(adapterDir)
	if err != nil {
		return err
	}
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, 1))
	if err != nil {
		return err
	}
	if err := m.Load(adapterDir, loadOptions...); err != nil {
		return err
	}
	if _, ok := method.(peft.Merger); !ok {
		return fmt.Errorf("%s: a %s adapter adds computation that no weight can hold, so it cannot be merged into the base: run it unmerged (examples/generate -adapter %s)",
			adapterDir, method.Name(), adapterDir)
	}
	if err := m.Merge(); err != nil {
		return err
	}
	var present []string
	for _, name := range tokenizerFiles {
		if _, err := fs.Stat(fsys, name); err == nil {
			present = append(present, name)
		}
	}
	if err := llama.SaveHF(out, cfg, ctx, fsys, present...); err != nil {
		return err
	}
	fmt.Printf("merged %s (%s) into the base model and wrote %s (config.json, model.safetensors, %v)\n",
		adapterDir, method.Name(), out, present)
	return nil
}
