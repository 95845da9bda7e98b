// Command sentiment fine-tunes the reference Llama model on a small sentiment task (short product
// reviews, generated in code) with every method of the SDK, and prints one table to compare them:
// method, trainable share, steps per second, loss and accuracy before and after.
//
// The base model is first pretrained with next-token loss on the reviews' text, so the methods
// that freeze it start from a model that has read reviews before; each method then trains the
// same number of steps on the same batches.
//
//	go run ./examples/sentiment
//	go run ./examples/sentiment -steps 300 -methods lora,full
package main

import (
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"

	"peft/full"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/experiment"
)

func main() {
	steps := flag.Int("steps", 200, "fine-tuning steps per method")
	pretrainSteps := flag.Int("pretrain-steps", 150, "next-token pretraining steps of the base model")
	methods := flag.String("methods", "", "comma-separated methods to run (default: all)")
	verbose := flag.Bool("v", false, "show training progress")
	flag.Parse()
	if err := run(*steps, *pretrainSteps, *methods, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "sentiment:", err)
		os.Exit(1)
	}
}

func run(steps, pretrainSteps int, methodList string, verbose bool) error {
	b, err := backend.Get()
	if err != nil {
		return err
	}
	fmt.Println(backend.Description())

	opts := experiment.DefaultOptions()
	opts.PretrainSteps = pretrainSteps
	progress := peft.ProgressOff
	if verbose {
		progress, opts.Progress, opts.Output = peft.ProgressAuto, peft.ProgressAuto, os.Stdout
	}
	pretrain, err := full.New(full.DefaultConfig())
	if err != nil {
		return err
	}
	fmt.Printf("pretraining the base model (%d layers, hidden %d, vocabulary %d) for %d steps on review text…\n",
		opts.Config.NumLayers, opts.Config.HiddenSize, opts.Config.VocabSize, pretrainSteps)
	setup, err := experiment.NewSetup(b, opts, pretrain)
	if err != nil {
		return err
	}
	if n := len(setup.PretrainLosses); n > 0 {
		fmt.Printf("next-token loss %.3f → %.3f\n\n", setup.PretrainLosses[0], setup.PretrainLosses[n-1])
	}

	var wanted []string
	if methodList != "" {
		wanted = strings.Split(methodList, ",")
	}
	var results []*experiment.Result
	for _, c := range experiment.Candidates() {
		if wanted != nil && !slices.Contains(wanted, c.Name) {
			continue
		}
		method, err := c.New(steps)
		if err != nil {
			return err
		}
		fmt.Printf("fine-tuning with %s for %d steps…\n", c.Name, steps)
		r, err := setup.FineTune(c.Name, method, steps, c.LearningRate, progress, os.Stdout)
		if err != nil {
			return err
		}
		fmt.Printf("  %s\n", r.Report)
		results = append(results, r)
	}
	if len(results) == 0 {
		return fmt.Errorf("no method matches -methods %q", methodList)
	}
	fmt.Printf("\nsentiment task: %d training batches of %d reviews, %d held-out batches, %d steps per method\n\n",
		len(setup.Train), setup.Batch, len(setup.Eval), steps)
	return experiment.WriteTable(os.Stdout, results)
}
