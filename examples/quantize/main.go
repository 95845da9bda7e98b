// Command quantize converts a safetensors file to bitsandbytes' 4-bit layout, the one Hugging
// Face 4-bit checkpoints use: every F32 2-D tensor whose name ends in ".weight" is quantized
// (package peft/bnb) and written as NAME (packed U8 [(n+1)/2, 1]), NAME.absmax, NAME.quant_map,
// NAME.nested_absmax and NAME.nested_quant_map (with double quantization) and
// NAME.quant_state.bitsandbytes__<type> (the quant state as UTF-8 JSON); every other tensor is
// copied unchanged, and so is the file's metadata. bnb.Quantized.Tensors documents the dtypes and
// shapes.
//
//	go run ./examples/quantize -in model.safetensors -out model-nf4.safetensors
//	go run ./examples/quantize -in FILE.safetensors -out OUT.safetensors [-blocksize 64] [-double-quant=true] [-type nf4]
//
// The last block of a tensor whose size is not a multiple of the block size is shorter, as in
// bitsandbytes (no padding). A block size that is not a power of two from 32 to 4096, an unknown
// type, a tensor with non-finite values or an input that is not a valid safetensors file is an
// error, and then nothing is written: the output is written atomically, after every tensor is
// quantized.
//
// To load the result, put it as model.safetensors in a Hugging Face model folder: qlora.Dequantized
// gives that folder with the 4-bit weights dequantized exactly, for the family's loader
// (llama.LoadPretrainedFS), and the 4-bit weights for QLoRA.UsePrequantized;
// bnb.DequantizeFile does the same for any file.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"

	"peft/peft/bnb"
	"peft/peft/safetensors"
)

func main() {
	in := flag.String("in", "", "safetensors file to quantize")
	out := flag.String("out", "", "safetensors file to write")
	blockSize := flag.Int("blocksize", 64, "values per absmax scale: a power of two from 32 to 4096")
	doubleQuant := flag.Bool("double-quant", true, "quantize the absmax scales to 8 bits (blocks of 256)")
	quantType := flag.String("type", "nf4", "4-bit type: nf4 or fp4")
	flag.Parse()
	if *in == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "quantize: -in and -out are required")
		flag.Usage()
		os.Exit(2)
	}
	opts := bnb.Options{Type: bnb.QuantType(*quantType), BlockSize: *blockSize, DoubleQuant: *doubleQuant}
	if err := run(*in, *out, opts, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "quantize:", err)
		os.Exit(1)
	}
}

// run quantizes the file in into out and prints a summary to w.
func run(in, out string, opts bnb.Options, w io.Writer) error {
	if err := opts.Validate(); err != nil {
		return err
	}
	f, err := safetensors.Read(in)
	if err != nil {
		return err
	}
	tensors, err := bnb.QuantizeFile(f, opts)
	if err != nil {
		return err
	}
	if err := safetensors.Write(out, tensors, f.Metadata); err != nil {
		return err
	}
	var inBytes, outBytes, quantizedBytes, params int64
	for _, t := range f.Tensors {
		inBytes += int64(len(t.Data))
	}
	written, err := safetensors.Read(out)
	if err != nil {
		return err
	}
	names := bnb.QuantizedNames(written)
	for _, t := range tensors {
		outBytes += int64(len(t.Data))
	}
	for _, name := range names {
		q, err := bnb.FromTensors(written, name)
		if err != nil {
			return err
		}
		quantizedBytes += q.Bytes()
		params += int64(q.Len())
	}
	fmt.Fprintf(w, "quantized %d tensors (%s, blocks of %d, double quantization %v) into %s: tensor data %d → %d bytes",
		len(names), opts.Type, opts.BlockSize, opts.DoubleQuant, out, inBytes, outBytes)
	if params > 0 {
		fmt.Fprintf(w, ", %.3f bits per quantized value", 8*float64(quantizedBytes)/float64(params))
	}
	fmt.Fprintln(w)
	return nil
}
