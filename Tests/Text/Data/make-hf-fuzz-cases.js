// Generator of hf-fuzz-cases.jsonl. Run with node after `npm install tokenizers@0.23.2`:
//   node make-hf-fuzz-cases.js /path/to/deepseek-v3/tokenizer.json > hf-fuzz-cases.jsonl
const fs=require('fs');
const {Tokenizer}=require('tokenizers');
let seed=12345; const rnd=()=>{seed=(seed*1103515245+12345)&0x7fffffff; return seed/0x7fffffff;};
const pick=a=>a[Math.floor(rnd()*a.length)];
const pools=[
 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'.split(''),
 '0123456789'.split(''),
 '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~'.split(''),
 [' ','  ','\t','\n','\r','\r\n','\x0b','\x0c','\x85','\u00a0','\u1680','\u2000','\u2028','\u3000','\ufeff','\u200b','\u200d'],
 ['é','ñ','ß','Å','\u0301','\u0308','ا','ש','Ж','λ','ก','ि','्'],
 ['你','好','世','界','中','文','々','〆','あ','カ','ｶ','한','国','龥','鿿','㐀','。','，','！'],
 ['😀','🔥','👩\u200d👧','🇺🇸','\u{20000}','\u{2A6DF}','𝐀','𝐳','𝟏','𝟗','\u{10400}','\u{11066}','\u{1D160}','🏻','\u{E0001}','\u{1F100}','\u{10FFFD}','\u{1F1E6}','𐌰','\u{1D7CE}\u{1D7CF}\u{1D7D0}\u{1D7D1}','\u{16FE0}','\u{1F3FB}','\u{E0100}','\u{1039F}','\u{12000}'],
 ['<｜User｜>','<｜Assistant｜>','<｜begin▁of▁sentence｜>','<|EOT|>','<｜','｜>','▁','<think>','<｜tool▁sep｜>'],
 ['the',' the',' of','ing','tion','Hello',' world','123456','3.14','don\'t','I\'m'],
];
// Writes hf-fuzz-cases.jsonl: the first 2000 strings with the ids of Hugging Face tokenizers (npm "tokenizers" 0.23.2, the Rust library), addSpecialTokens false.
const out=[];
for(let i=0;i<4000;i++){ let n=1+Math.floor(rnd()*30); let s=''; const bias=Math.floor(rnd()*pools.length);
 for(let j=0;j<n;j++){ s+= pick(rnd()<0.4?pools[bias]:pick(pools)); } out.push(s);}
const t=Tokenizer.fromFile(process.argv[2]);
(async()=>{ for(const s of out.slice(0,2000)){ const e=await t.encode(s,null,{addSpecialTokens:false});
  process.stdout.write(JSON.stringify({text:s,ids:Array.from(e.getIds())}).replace(/[\u007f-\uffff]/g,c=>'\\u'+c.charCodeAt(0).toString(16).padStart(4,'0'))+'\n'); } })();
